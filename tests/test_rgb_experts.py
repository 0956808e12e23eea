"""The colour world's data-free banks and paper-figure commands on tiny models: a corpus drawn from
the text-conditional DDPM with prompts cycled over the colours at a CFG scale (each sample the
pipeline's own sample of its prompt), resumed and recorded; and `ppap sample` with a prompt, a
transformers guide and its experts, for a class target and for a reference silhouette."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ppap import PPAPError, zoo
from ppap.config import TrainConfig
from ppap.fashion_mnist import fashion_mnist_dir

needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
TINY_TRAIN = TrainConfig(experts="2", iterations=2, batch_size=4, rank=2, alpha=2, checkpoint_every=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """The tiny colour DDPM and guides, in the zoo's layout (``weights/NAME``)."""
    from ppap.recipes_rgb import TINY_RGB_DDPM_RECIPE, TINY_RGB_GUIDE_RECIPES, train_rgb_ddpm, train_rgb_guide

    root = tmp_path_factory.mktemp("rgb")
    train_rgb_ddpm(root / "weights" / "fashion-rgb-ddpm", root / "work-ddpm", TINY_RGB_DDPM_RECIPE)
    for name in ("fashion-rgb-classifier", "fashion-rgb-segmenter"):
        train_rgb_guide(name, root / "weights" / name, root / f"work-{name}", TINY_RGB_GUIDE_RECIPES[name])
    return root / "weights"


@pytest.fixture
def tiny_zoo(tiny_weights, monkeypatch):
    monkeypatch.setattr(zoo, "weights_dir", lambda: tiny_weights)
    return tiny_weights


def _tiny(name: str, corpus_size: int = 10):
    from ppap.recipes import EXPERT_RECIPES

    return replace(EXPERT_RECIPES[name], corpus_size=corpus_size, train=TINY_TRAIN)


def test_the_colour_recipes_cycle_the_colour_prompts_at_cfg_3():
    from ppap.fashion_rgb import COLOUR_NAMES
    from ppap.recipes import EXPERT_RECIPES

    for name, guide, task in [
        ("fashion-rgb-ppap5", "fashion-rgb-classifier", "classification"),
        ("fashion-rgb-segmenter-ppap5", "fashion-rgb-segmenter", "segmentation"),
    ]:
        r = EXPERT_RECIPES[name]
        assert (r.diffusion, r.guide, r.task, r.corpus_size, r.cfg_scale) == ("fashion-rgb-ddpm", guide, task, 4000, 3.0)
        assert r.prompts == tuple(f"a {c} garment" if c != "orange" else "an orange garment" for c in COLOUR_NAMES)
        entry = zoo.ZOO[name]
        assert entry.kind == "experts" and entry.guide == guide and entry.task == task


@needs_data
def test_a_prompted_corpus_is_the_pipelines_own_samples_resumes_and_refuses_other_conditions(tiny_zoo, tmp_path):
    from ppap.batch_sampling import sample_generators
    from ppap.corpus import CORPUS_MANIFEST, load_corpus, shard_path
    from ppap.images import to_hwc_uint8
    from ppap.loading import load_guide, load_pipeline
    from ppap.recipes import cycled_prompt_conditioning, shared_corpus_dir, train_zoo_experts
    from ppap.train import data_free_experts

    r = _tiny("fashion-rgb-ppap5")
    work = tmp_path / "runs" / "zoo"
    card = train_zoo_experts("fashion-rgb-ppap5", tmp_path / "out", work / "fashion-rgb-ppap5", r)
    assert card["recipe"]["prompts"] == list(r.prompts) and card["recipe"]["cfg_scale"] == 3.0
    assert json.loads((tmp_path / "out" / "ppap_experts.json").read_text())["trained"]
    # the corpus: beside the zoo work folder, not where an unprompted corpus of the model goes
    corpus = shared_corpus_dir(work, r.diffusion, r.corpus_size, r.prompts, r.cfg_scale)
    assert corpus.parent == tmp_path / "runs" / "corpus" and corpus != shared_corpus_dir(work, r.diffusion, r.corpus_size)
    assert corpus != shared_corpus_dir(work, r.diffusion, r.corpus_size, r.prompts, 2.0)
    condition = json.loads((corpus / CORPUS_MANIFEST).read_text())["condition"]
    assert condition["prompts"] == list(r.prompts) and condition["guidance_scale"] == 3.0
    assert condition["prompt_embeds"] is not None
    # sample k is the pipeline's own sample of prompt k mod 8 at CFG 3, from sample k's seed (one batch, as the corpus drew it)
    images = load_corpus(corpus)
    pipe = load_pipeline(str(tiny_zoo / "fashion-rgb-ddpm"))
    own = pipe(
        prompt=[r.prompts[k % len(r.prompts)] for k in range(r.corpus_size)],
        guidance_scale=3.0,
        batch_size=r.corpus_size,
        generator=sample_generators(0, 0, r.corpus_size),
        num_inference_steps=25,
        sampler="ddim",
        output_type="latent",
        progress=False,
    ).images
    assert np.array_equal(to_hwc_uint8(own.clamp(-1, 1)), to_hwc_uint8(images))
    # a second prompt gives another sample: the prompt really conditions the corpus
    assert not torch.equal(images[0], images[8])
    # resumed: a lost shard is drawn again, the same bytes; the finished experts are kept
    shard = shard_path(corpus, 0)
    before = shard.read_bytes()
    shard.unlink()
    again = train_zoo_experts("fashion-rgb-ppap5", tmp_path / "out", work / "fashion-rgb-ppap5", r)
    assert shard.read_bytes() == before and again["stats"] == card["stats"]
    # the segmenter's bank draws from the very same corpus (no second drawing)
    stamp = shard.stat().st_mtime_ns
    train_zoo_experts(
        "fashion-rgb-segmenter-ppap5", tmp_path / "out-seg", work / "fashion-rgb-segmenter-ppap5", _tiny("fashion-rgb-segmenter-ppap5")
    )
    assert shard.stat().st_mtime_ns == stamp
    # a corpus drawn with other conditions is refused, not mixed in
    guide = load_guide("fashion-rgb-classifier")
    for prompts, scale in [(r.prompts, 2.0), (r.prompts[::-1], 3.0)]:
        cond = cycled_prompt_conditioning(pipe, prompts, r.corpus_size, scale)
        with pytest.raises(PPAPError, match="holds a different corpus.*condition"):
            data_free_experts(
                pipe,
                r.diffusion,
                guide,
                tmp_path / "w2",
                corpus_size=r.corpus_size,
                cfg=r.train,
                corpus_dir=corpus,
                conditioning=cond,
                prompts=prompts,
            )
    with pytest.raises(PPAPError, match="holds a different corpus.*condition"):  # nor an unprompted one
        data_free_experts(pipe, r.diffusion, guide, tmp_path / "w3", corpus_size=r.corpus_size, cfg=r.train, corpus_dir=corpus)
