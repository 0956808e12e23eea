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
    for name in ("fashion-rgb-classifier", "fashion-rgb-segmenter", "fashion-rgb-evaluator"):
        train_rgb_guide(name, root / "weights" / name, root / f"work-{name}", TINY_RGB_GUIDE_RECIPES[name])
    return root / "weights"


@pytest.fixture
def tiny_zoo(tiny_weights, monkeypatch):
    monkeypatch.setattr(zoo, "weights_dir", lambda: tiny_weights)
    return tiny_weights


def _tiny(name: str, corpus_size: int = 10):
    from ppap.recipes import EXPERT_RECIPES

    return replace(EXPERT_RECIPES[name], corpus_size=corpus_size, train=TINY_TRAIN)


@pytest.fixture(scope="module")
def tiny_banks(tiny_weights):
    """Both colour banks by their recipes (tiny sizes) on the tiny models, into the zoo's layout
    (``weights/NAME``), work in ``runs/zoo/NAME``."""
    from ppap.recipes import train_zoo_experts

    root = tiny_weights.parent
    cards = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zoo, "weights_dir", lambda: tiny_weights)
        for name in ("fashion-rgb-ppap5", "fashion-rgb-segmenter-ppap5"):
            cards[name] = train_zoo_experts(name, tiny_weights / name, root / "runs" / "zoo" / name, _tiny(name))
    return {"root": root, "cards": cards}


def test_the_colour_recipes_cycle_the_colour_prompts_without_cfg_on_one_corpus():
    from ppap.fashion_rgb import COLOUR_NAMES
    from ppap.recipes import EXPERT_RECIPES

    for name, guide, task in [
        ("fashion-rgb-ppap5", "fashion-rgb-classifier", "classification"),
        ("fashion-rgb-segmenter-ppap5", "fashion-rgb-segmenter", "segmentation"),
    ]:
        r = EXPERT_RECIPES[name]
        assert (r.diffusion, r.guide, r.task, r.corpus_size, r.cfg_scale, r.sampler) == ("fashion-rgb-ddpm", guide, task, 4000, 1.0, "ddpm")
        assert r.prompts == tuple(f"a {c} garment" if c != "orange" else "an orange garment" for c in COLOUR_NAMES)
        entry = zoo.ZOO[name]
        assert entry.kind == "experts" and entry.guide == guide and entry.task == task


@needs_data
def test_a_prompted_corpus_is_the_pipelines_own_samples_resumes_and_refuses_other_conditions(tiny_banks, tiny_zoo, tmp_path):
    from ppap.batch_sampling import sample_generators
    from ppap.corpus import CORPUS_MANIFEST, load_corpus, shard_path
    from ppap.images import to_hwc_uint8
    from ppap.loading import load_guide, load_pipeline
    from ppap.recipes import cycled_prompt_conditioning, shared_corpus_dir, train_zoo_experts
    from ppap.train import data_free_experts

    r, root = _tiny("fashion-rgb-ppap5"), tiny_banks["root"]
    card, out, work = tiny_banks["cards"]["fashion-rgb-ppap5"], root / "weights" / "fashion-rgb-ppap5", root / "runs" / "zoo"
    assert card["recipe"]["prompts"] == list(r.prompts) and card["recipe"]["cfg_scale"] == r.cfg_scale == 1.0
    assert json.loads((out / "ppap_experts.json").read_text())["trained"] == ["expert_0", "expert_1"]
    # the corpus: beside the zoo work folder, not where an unprompted corpus of the model goes
    corpus = shared_corpus_dir(work, r.diffusion, r.corpus_size, r.prompts, r.cfg_scale, r.sampler)
    assert corpus.parent == root / "runs" / "corpus" and corpus != shared_corpus_dir(work, r.diffusion, r.corpus_size)
    assert corpus != shared_corpus_dir(work, r.diffusion, r.corpus_size, r.prompts, 2.0, r.sampler)
    assert corpus != shared_corpus_dir(work, r.diffusion, r.corpus_size, r.prompts, r.cfg_scale, "ddim")
    assert card["recipe"]["corpus_sampler"] == "ddpm"
    pipe = load_pipeline(str(tiny_zoo / "fashion-rgb-ddpm"))
    # sample k is the pipeline's own sample of prompt k mod 8 from sample k's seed (one batch, as the
    # corpus drew it): at the recipes' scale, and at CFG 3 (a corpus of its own, beside the bank's)
    cfg3 = replace(r, cfg_scale=3.0)
    train_zoo_experts("fashion-rgb-ppap5", tmp_path / "cfg3", tmp_path / "runs" / "zoo" / "cfg3", cfg3)
    cfg3_corpus = shared_corpus_dir(tmp_path / "runs" / "zoo", r.diffusion, r.corpus_size, r.prompts, 3.0, r.sampler)
    for root_of, scale in ((corpus, r.cfg_scale), (cfg3_corpus, 3.0)):
        condition = json.loads((root_of / CORPUS_MANIFEST).read_text())["condition"]
        assert condition["prompts"] == list(r.prompts) and condition["guidance_scale"] == scale
        assert condition["prompt_embeds"] is not None
        images = load_corpus(root_of)
        own = pipe(
            prompt=[r.prompts[k % len(r.prompts)] for k in range(r.corpus_size)],
            guidance_scale=scale,
            batch_size=r.corpus_size,
            generator=sample_generators(0, 0, r.corpus_size),
            num_inference_steps=25,
            sampler="ddpm",
            output_type="latent",
            progress=False,
        ).images
        assert np.array_equal(to_hwc_uint8(own.clamp(-1, 1)), to_hwc_uint8(images))
        assert not torch.equal(images[0], images[8]) or not torch.equal(images[0], images[1])  # not one image repeated
    assert not torch.equal(load_corpus(corpus), load_corpus(cfg3_corpus))
    # resumed: a lost shard is drawn again, the same bytes; the finished experts are kept
    shard = shard_path(corpus, 0)
    before = shard.read_bytes()
    shard.unlink()
    again = train_zoo_experts("fashion-rgb-ppap5", out, work / "fashion-rgb-ppap5", r)
    assert shard.read_bytes() == before and again["stats"] == card["stats"]
    # the segmenter's bank read the same corpus: one folder, drawn once
    seg = _tiny("fashion-rgb-segmenter-ppap5")
    assert shared_corpus_dir(work, seg.diffusion, seg.corpus_size, seg.prompts, seg.cfg_scale, seg.sampler) == corpus
    assert [p.name for p in (root / "runs" / "corpus").iterdir()] == [corpus.name]
    assert json.loads((corpus / CORPUS_MANIFEST).read_text())["sampler"] == "ddpm"
    # a corpus drawn with other conditions is refused, not mixed in
    guide = load_guide("fashion-rgb-classifier")
    kw = dict(corpus_size=r.corpus_size, cfg=r.train, corpus_dir=corpus, corpus_sampler=r.sampler)
    for prompts, scale in [(r.prompts, 2.0), (r.prompts[::-1], 1.0)]:
        cond = cycled_prompt_conditioning(pipe, prompts, r.corpus_size, scale)
        with pytest.raises(PPAPError, match="holds a different corpus.*condition"):
            data_free_experts(pipe, r.diffusion, guide, tmp_path / "w2", conditioning=cond, prompts=prompts, **kw)
    with pytest.raises(PPAPError, match="holds a different corpus.*condition"):  # nor an unprompted one
        data_free_experts(pipe, r.diffusion, guide, tmp_path / "w3", **kw)
    cond = cycled_prompt_conditioning(pipe, r.prompts, r.corpus_size, r.cfg_scale)
    with pytest.raises(PPAPError, match="holds a different corpus.*sampler"):  # nor DDIM samples of the same prompts
        data_free_experts(
            pipe, r.diffusion, guide, tmp_path / "w4", conditioning=cond, prompts=r.prompts, **(kw | {"corpus_sampler": "ddim"})
        )
    assert shard.read_bytes() == before


@needs_data
def test_cli_red_sneakers_a_prompt_a_transformers_classifier_and_its_experts(tiny_banks, tmp_path, capsys):
    from ppap.batch_sampling import sample_generators
    from ppap.cli import main
    from ppap.images import to_hwc_uint8
    from ppap.loading import load_experts, load_guide, load_pipeline

    weights, bank = tiny_banks["root"] / "weights", tiny_banks["root"] / "weights" / "fashion-rgb-ppap5"
    ddpm, clf = str(weights / "fashion-rgb-ddpm"), str(weights / "fashion-rgb-classifier")
    common = ["sample", "--diffusion", ddpm, "--prompt", "a red garment", "--cfg-scale", "3", "--num", "2", "--steps", "3", "--quiet"]
    guided = ["--guide", clf, "--experts", str(bank), "--target", "sneaker"]
    assert main(common + guided + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(common + ["--method", "unguided", "--out", str(tmp_path / "u.png")]) == 0
    a, u = np.load(tmp_path / "a.npz"), np.load(tmp_path / "u.npz")
    assert a["images"].shape == (2, 32, 32, 3) and a["targets"].tolist() == [7, 7]  # sneaker
    assert not np.array_equal(a["images"], u["images"])  # the experts guided
    # the library's call with the same prompt, CFG, guide, experts and seeds gives the same images
    pipe = load_pipeline(ddpm)
    guide = load_guide(clf)
    experts = load_experts(str(bank), guide, pipe.diffusion)
    x = pipe(
        prompt="a red garment",
        guidance_scale=3.0,
        batch_size=2,
        experts=experts,
        target="sneaker",
        generator=sample_generators(0, 0, 2),
        num_inference_steps=3,
        sampler="ddim",
        output_type="latent",
        progress=False,
    ).images
    assert np.array_equal(to_hwc_uint8(x.clamp(-1, 1)), a["images"])


@needs_data
def test_cli_blue_garments_in_a_reference_layout_with_the_segmenters_experts(tiny_banks, tmp_path):
    from PIL import Image

    from ppap.cli import main
    from ppap.fashion_mnist import load_fashion_mnist
    from ppap.images import load_reference_image
    from ppap.loading import load_guide

    weights, bank = tiny_banks["root"] / "weights", tiny_banks["root"] / "weights" / "fashion-rgb-segmenter-ppap5"
    seg = str(weights / "fashion-rgb-segmenter")
    grey, _ = load_fashion_mnist("test")
    silhouette = tmp_path / "silhouette.png"  # a grey garment, 32 x 32: its segmentation is the layout
    Image.fromarray(((grey[0, 0] + 1) * 127.5).round().byte().numpy()).save(silhouette)
    cmd = ["sample", "--diffusion", str(weights / "fashion-rgb-ddpm"), "--prompt", "a blue garment", "--cfg-scale", "3"]
    cmd += ["--guide", seg, "--experts", str(bank), "--target-image", str(silhouette), "--num", "2", "--steps", "3", "--quiet"]
    assert main(cmd + ["--out", str(tmp_path / "s.png")]) == 0
    out = np.load(tmp_path / "s.npz")
    reference = load_reference_image(silhouette, (3, 32, 32))
    with torch.no_grad():
        layout = load_guide(seg)(reference).argmax(1)[0]  # [32, 32] labels: background + class per pixel
    assert out["images"].shape == (2, 32, 32, 3) and out["targets"].shape == (2, 32, 32)
    assert all(np.array_equal(t, layout.numpy()) for t in out["targets"])


@needs_data
def test_the_demos_colour_row_samples_red_sneakers_and_blue_garments_in_a_reference_layout(tiny_banks, tiny_zoo, capsys):
    from ppap.demo import COLOUR_CFG, colour_row

    figures, grid = colour_row(2, 3)
    assert "[colour] red sneakers and blue garments in a reference layout: 2 each, DDPM-3, CFG 3" in capsys.readouterr().out
    assert figures["cfg_scale"] == COLOUR_CFG and figures["per_row"] == 2
    for key in ("sneaker_accuracy_by_evaluator", "layout_iou_by_segmenter"):
        assert figures[key].keys() == {"unguided (CFG)", "ppap"} and all(0 <= v <= 1 for v in figures[key].values())
    fidelity = figures["colour_fidelity"]
    assert len(fidelity) == 2 and all(v.keys() == {"unguided (CFG)", "ppap"} for v in fidelity.values())
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] >= 2 * 64


def test_the_demos_colour_row_is_one_line_when_the_colour_models_are_not_built(tmp_path, monkeypatch, capsys):
    from ppap.demo import colour_row

    monkeypatch.setattr(zoo, "weights_dir", lambda: tmp_path)
    assert colour_row(2, 3) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[colour] skipped: the colour zoo models are not built") and "fashion-rgb-ddpm" in out[0]
