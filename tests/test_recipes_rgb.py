"""The fashion-rgb-ddpm recipe on tiny sizes: the DDPM loop with a text encoder, exact resume,
and the exported pipeline (UNet2DConditionModel + text encoder + tokenizer) that loads and samples."""

import json

import pytest
import torch

from ppap.data import fashion_mnist_dir

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
def test_a_resume_state_of_another_recipe_is_refused(tmp_path):
    from dataclasses import replace

    from ppap import PPAPError
    from ppap.recipes_rgb import TINY_RGB_DDPM_RECIPE, train_rgb_ddpm

    r = TINY_RGB_DDPM_RECIPE
    train_rgb_ddpm(tmp_path / "out" / "m", tmp_path / "work", r, stop_after=1)
    with pytest.raises(PPAPError, match="text_width differs"):
        train_rgb_ddpm(tmp_path / "out" / "m", tmp_path / "work", replace(r, text_width=8), stop_after=1)
    more = train_rgb_ddpm(tmp_path / "out" / "m", tmp_path / "work", replace(r, iterations=2), stop_after=1)  # a longer run goes on
    assert more["done"] and more["iterations"] == 2
