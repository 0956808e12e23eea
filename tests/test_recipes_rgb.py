"""The fashion-rgb-ddpm recipe on tiny sizes: the DDPM loop with a text encoder, exact resume,
and the exported pipeline (UNet2DConditionModel + text encoder + tokenizer) that loads and samples."""

import json

import pytest
import torch

from ppap.fashion_mnist import fashion_mnist_dir

needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_data
def test_tiny_rgb_ddpm_trains_resumes_exactly_and_exports_a_text_pipeline(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from ppap import PPAPPipeline
    from ppap.fashion_rgb import PROMPT_MAX_LENGTH
    from ppap.io import load_resume_state
    from ppap.loading import load_pipeline
    from ppap.recipes_rgb import TINY_RGB_DDPM_RECIPE, build_prompt_tokenizer, prompt_ids, train_rgb_ddpm

    r = TINY_RGB_DDPM_RECIPE
    straight = train_rgb_ddpm(tmp_path / "out-a" / "m", tmp_path / "work-a", r)
    assert straight["done"] and straight["iterations"] == r.iterations
    # killed after a checkpoint and run again: the same weights as the uninterrupted run
    first = train_rgb_ddpm(tmp_path / "out-b" / "m", tmp_path / "work-b", r, stop_after=r.iterations // 2)
    assert first == {"step": r.iterations // 2, "done": False} and not (tmp_path / "out-b" / "m").exists()
    resumed = train_rgb_ddpm(tmp_path / "out-b" / "m", tmp_path / "work-b", r)
    assert resumed["done"]
    a, b = load_resume_state(tmp_path / "work-a" / "resume.pt"), load_resume_state(tmp_path / "work-b" / "resume.pt")
    assert a["step"] == b["step"] == r.iterations and a["losses"] == b["losses"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert any(k.startswith("text_encoder.") for k in a["model"])  # the text encoder is trained with the UNet
    # the exported pipeline: diffusers' folder with the text encoder and tokenizer, EMA weights
    folder = tmp_path / "out-b" / "m"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PPAPPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = PPAPPipeline.from_pretrained(folder)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.unet.config.in_channels == 3 and pipe.unet.config.cross_attention_dim == r.text_width
    ema = b["ema"]
    assert all(torch.equal(v, ema[f"unet.{k}"]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, ema[f"text_encoder.{k}"]) for k, v in pipe.text_encoder.state_dict().items())
    ids, empty = prompt_ids(build_prompt_tokenizer())
    assert torch.equal(pipe.tokenizer("a red garment", padding="max_length", return_tensors="pt").input_ids[0], ids[0, 1])
    assert ids.shape == (8, 7, PROMPT_MAX_LENGTH) and bool((empty == pipe.tokenizer.pad_token_id).all())
    card = json.loads((folder / "ppap_card.json").read_text())
    assert card["iterations"] == r.iterations and card["recipe"]["text_width"] == r.text_width
    # ppap's loader gives the same components; a prompt with CFG samples colour images
    loaded = load_pipeline(str(folder))
    assert isinstance(loaded.text_encoder, CLIPTextModel)
    x = loaded(prompt="a red garment", guidance_scale=3.0, batch_size=2, num_inference_steps=2, output_type="pt", progress=False).images
    assert x.shape == (2, 3, 32, 32) and bool(torch.isfinite(x).all())


@needs_data
def test_tiny_rgb_ddpm_resumes_on_another_device(tmp_path):
    """Half the run on the CPU, the rest on the test device (CUDA under `make gpu-check`): the
    draws stay on the CPU, so on the CPU the split run is the straight run bit for bit, and on a
    GPU it follows it to float tolerance; the exported model is on the CPU either way."""
    from ppap.io import load_resume_state
    from ppap.recipes_rgb import TINY_RGB_DDPM_RECIPE, train_rgb_ddpm

    from conftest import TEST_DEVICE

    r = TINY_RGB_DDPM_RECIPE
    train_rgb_ddpm(tmp_path / "out-a" / "m", tmp_path / "work-a", r)
    assert train_rgb_ddpm(tmp_path / "out-b" / "m", tmp_path / "work-b", r, stop_after=r.iterations // 2)["step"] == r.iterations // 2
    card = train_rgb_ddpm(tmp_path / "out-b" / "m", tmp_path / "work-b", r, device=TEST_DEVICE)
    assert card["done"] and card["device"] == (torch.cuda.get_device_name(TEST_DEVICE) if TEST_DEVICE.type == "cuda" else TEST_DEVICE.type)
    a, b = load_resume_state(tmp_path / "work-a" / "resume.pt"), load_resume_state(tmp_path / "work-b" / "resume.pt")
    assert b["step"] == r.iterations and all(v.device.type == "cpu" for v in b["ema"].values())
    exact = TEST_DEVICE.type == "cpu"
    assert a["losses"] == b["losses"] if exact else torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-3)
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]) if exact else torch.allclose(a["ema"][k], b["ema"][k], atol=1e-4)


def test_zoo_train_device_and_stop_after_are_checked_in_one_line(tmp_path, capsys):
    from ppap.cli import main

    work = ["--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")]
    assert main(["zoo", "train", "fashion-rgb-classifier", "--device", "cuda", *work]) == 2
    assert "apply to fashion-ddpm and fashion-rgb-ddpm only, not 'fashion-rgb-classifier'" in capsys.readouterr().err
    assert main(["zoo", "train", "fashion-rgb-ddpm", "--stop-after", "0", *work]) == 2
    assert "--stop-after must be a positive number of steps, got 0" in capsys.readouterr().err
    assert main(["zoo", "train", "fashion-rgb-ddpm", "--device", "tpu", *work]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "w").exists()


@needs_data
def test_a_resume_state_of_another_recipe_is_refused(tmp_path):
    from dataclasses import replace

    from ppap import PPAPError
    from ppap.recipes_rgb import TINY_RGB_DDPM_RECIPE, train_rgb_ddpm

    r = TINY_RGB_DDPM_RECIPE
    train_rgb_ddpm(tmp_path / "out" / "m", tmp_path / "work", r, stop_after=1)
    with pytest.raises(PPAPError, match="text_width: 16 there, 8 here"):
        train_rgb_ddpm(tmp_path / "out" / "m", tmp_path / "work", replace(r, text_width=8), stop_after=1)
    more = train_rgb_ddpm(tmp_path / "out" / "m", tmp_path / "work", replace(r, iterations=2), stop_after=1)  # a longer run goes on
    assert more["done"] and more["iterations"] == 2


@needs_data
@pytest.mark.parametrize("name", ["fashion-rgb-classifier", "fashion-rgb-segmenter", "fashion-rgb-evaluator"])
def test_tiny_rgb_guide_recipes_resume_exactly_and_save_transformers_guides(tmp_path, monkeypatch, name):
    from transformers import AutoImageProcessor
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ppap.fashion_rgb import load_fashion_rgb
    from ppap.io import load_resume_state
    from ppap.loading import load_guide
    from ppap.recipes_rgb import TINY_RGB_GUIDE_RECIPES, train_rgb_guide

    r = TINY_RGB_GUIDE_RECIPES[name]
    straight = train_rgb_guide(name, tmp_path / "a" / name, tmp_path / "wa", r)
    assert straight["done"] and straight["iterations"] == 2
    assert train_rgb_guide(name, tmp_path / "b" / name, tmp_path / "wb", r, stop_after=1) == {"step": 1, "done": False}
    assert train_rgb_guide(name, tmp_path / "b" / name, tmp_path / "wb", r)["done"]
    a, b = load_resume_state(tmp_path / "wa" / "resume.pt")["model"], load_resume_state(tmp_path / "wb" / "resume.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # saved with save_pretrained + its image processor; loaded as any user's transformers guide
    folder = tmp_path / "b" / name
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.size == {"height": r.input_size, "width": r.input_size}
    assert list(processor.image_mean) == list(IMAGENET_DEFAULT_MEAN) and list(processor.image_std) == list(IMAGENET_DEFAULT_STD)
    guide = load_guide(str(folder))
    assert guide.input_size == (r.input_size, r.input_size)
    assert all(torch.equal(v, b[k]) for k, v in guide.net.state_dict().items())
    x = load_fashion_rgb("test").images(slice(0, 3))
    out = guide(x)
    if name == "fashion-rgb-segmenter":
        assert guide.task == "segmentation" and len(guide.classes) == 11 and guide.classes[0] == "background"
        assert out.shape == (3, 11, 32, 32)
        assert guide.net(guide.preprocess(x)).logits.shape[-1] == r.input_size // 4  # logits at 1/4 of the input
    else:
        assert guide.task == "classification" and len(guide.classes) == 10 and out.shape == (3, 10)
    card = json.loads((folder / "ppap_card.json").read_text())
    assert ("test_miou" if name == "fashion-rgb-segmenter" else "test_accuracy") in card
    # in the zoo's layout, the zoo name loads it the same way
    from ppap import zoo

    monkeypatch.setattr(zoo, "weights_dir", lambda: tmp_path / "b")
    by_name = load_guide(name)
    assert by_name.ref == name and by_name.task == guide.task and torch.equal(by_name(x), out)


def test_zoo_train_runs_the_colour_recipes_into_the_zoo_layout(tmp_path, monkeypatch):
    """`ppap zoo train NAME` for the colour models: the recipe's output at --out/NAME (a folder), checkpoints in --work-dir/NAME."""
    from pathlib import Path

    from ppap import recipes_rgb
    from ppap.cli import main

    calls = []
    monkeypatch.setattr(
        recipes_rgb, "train_rgb_ddpm", lambda out, work, data_dir=None, **kw: calls.append(("ddpm", Path(out), Path(work))) or {}
    )
    monkeypatch.setattr(
        recipes_rgb, "train_rgb_guide", lambda name, out, work, data_dir=None: calls.append((name, Path(out), Path(work))) or {}
    )
    names = ["fashion-rgb-ddpm", "fashion-rgb-classifier", "fashion-rgb-segmenter", "fashion-rgb-evaluator"]
    for name in names:
        assert main(["zoo", "train", name, "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")]) == 0
    assert calls == [(kind, tmp_path / "m" / name, tmp_path / "w" / name) for kind, name in zip(["ddpm"] + names[1:], names)]
