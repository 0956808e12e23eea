"""Prompts in PPAPPipeline: encoded by the pipeline's own text encoder as diffusers' pipelines do,
saved and reloaded as diffusers components, and classifier-free guidance on them equal to
diffusers' scheduler loop."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ppap import PPAPError, PPAPPipeline
from ppap.text import build_text_encoder, build_word_tokenizer, tokenize

from conftest import tiny_cond_unet

WORDS = ["a", "red", "blue", "garment", "something", "in"]


def _text_pipe(seed: int = 0) -> PPAPPipeline:
    tokenizer = build_word_tokenizer(WORDS, max_length=5)
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(len(tokenizer), 5, width=8, layers=1, heads=2).eval()
    unet = tiny_cond_unet(seed, cross_attention_dim=8)
    return PPAPPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100), text_encoder=text_encoder, tokenizer=tokenizer)


def _reference_embeds(pipe, prompts):
    """What diffusers' pipelines do: the tokenizer's padded ids, the text encoder's last hidden states."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids).last_hidden_state


def test_word_tokenizer_pads_truncates_and_marks_unknown_words():
    tok = build_word_tokenizer(WORDS, max_length=5)
    assert tok.pad_token == "[PAD]" and tok.unk_token == "[UNK]" and tok.pad_token_id == 0 and tok.unk_token_id == 1
    ids = tokenize(tok, ["A Red garment", "a purple garment!", "", "something in red in blue a"]).tolist()
    v = tok.get_vocab()
    assert ids[0] == [v["a"], v["red"], v["garment"], 0, 0]  # lower-cased, padded
    assert ids[1] == [v["a"], 1, v["garment"], 1, 0]  # unknown word and punctuation -> [UNK]
    assert ids[2] == [0] * 5
    assert ids[3] == [v["something"], v["in"], v["red"], v["in"], v["blue"]]  # truncated


def test_encode_prompt_is_the_text_encoders_output_on_the_tokenizers_ids():
    pipe = _text_pipe()
    embeds, negative = pipe.encode_prompt(["a red garment", "blue"])
    assert negative is None and embeds.shape == (2, 5, 8)
    assert torch.equal(embeds, _reference_embeds(pipe, ["a red garment", "blue"]))
    embeds, negative = pipe.encode_prompt("a red garment", do_classifier_free_guidance=True)
    assert torch.equal(negative, _reference_embeds(pipe, [""]))  # the unconditional branch: the empty prompt
    _, negative = pipe.encode_prompt("a red garment", "blue", do_classifier_free_guidance=True)
    assert torch.equal(negative, _reference_embeds(pipe, ["blue"]))
    with pytest.raises(PPAPError, match="2 negative prompts for 1 prompts"):
        pipe.encode_prompt("red", ["a", "b"], do_classifier_free_guidance=True)


def test_a_saved_text_pipeline_reloads_with_diffusers_from_pretrained(tmp_path):
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from ppap.loading import load_pipeline

    pipe = _text_pipe()
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "PPAPPipeline" and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"][0] == "transformers"
    assert (tmp_path / "p" / "text_encoder" / "model.safetensors").exists()
    for again in (PPAPPipeline.from_pretrained(tmp_path / "p"), load_pipeline(str(tmp_path / "p"))):
        assert type(again) is PPAPPipeline
        assert isinstance(again.text_encoder, CLIPTextModel) and isinstance(again.tokenizer, PreTrainedTokenizerFast)
        assert type(again.unet) is type(pipe.unet) and type(again.scheduler) is type(pipe.scheduler)
        saved = pipe.text_encoder.state_dict()
        assert all(torch.equal(v, saved[k]) for k, v in again.text_encoder.state_dict().items())
        assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
        assert again.tokenizer.model_max_length == pipe.tokenizer.model_max_length
        assert torch.equal(again.encode_prompt("a red garment")[0], pipe.encode_prompt("a red garment")[0])
    # a pipeline without a text encoder saves and reloads as before
    plain = PPAPPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    plain.save_pretrained(tmp_path / "plain")
    assert PPAPPipeline.from_pretrained(tmp_path / "plain").text_encoder is None


def test_diffusers_own_from_pretrained_loads_a_saved_folder_with_the_users_consent(tmp_path, monkeypatch):
    """diffusers' custom-pipeline convention: the folder's ppap_pipeline.py (one import of the
    installed ppap) names the class; diffusers runs it only with trust_remote_code=True."""
    import diffusers
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where diffusers copies the module
    pipe = _text_pipe()
    pipe.save_pretrained(tmp_path / "p")
    code = (tmp_path / "p" / "ppap_pipeline.py").read_text()
    assert [line for line in code.splitlines() if line.startswith(("import", "from"))] == ["from ppap.pipeline import PPAPPipeline"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # no code runs without the user's consent
        diffusers.DiffusionPipeline.from_pretrained(tmp_path / "p", custom_pipeline="ppap_pipeline")
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "p", custom_pipeline="ppap_pipeline", trust_remote_code=True)
    assert type(again) is PPAPPipeline
    for name in ("unet", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    settings = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (again.scheduler, pipe.scheduler)]
    assert type(again.scheduler) is type(pipe.scheduler) and settings[0] == settings[1]
    assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert again.tokenizer.model_max_length == pipe.tokenizer.model_max_length
    assert torch.equal(again.encode_prompt("a red garment")[0], pipe.encode_prompt("a red garment")[0])
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    call = dict(prompt="a red garment", guidance_scale=3.0, latents=x_T, num_inference_steps=3, output_type="latent", progress=False)
    assert torch.equal(again(**call).images, pipe(**call).images)


@pytest.mark.parametrize("negative_prompt", [None, "blue"])
def test_cfg_on_prompts_equals_diffusers_reference_loop(negative_prompt):
    pipe = _text_pipe()
    scale, steps = 3.0, 6
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe(
        prompt="a red garment",
        negative_prompt=negative_prompt,
        guidance_scale=scale,
        latents=x_T,
        num_inference_steps=steps,
        output_type="latent",
        progress=False,
    ).images
    # diffusers' loop: the prompt and negative prompt embeddings, noise_uncond + s * (noise_text - noise_uncond)
    text = _reference_embeds(pipe, ["a red garment"]).expand(2, -1, -1)
    uncond = _reference_embeds(pipe, [negative_prompt or ""]).expand(2, -1, -1)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise_uncond, noise_text = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, text])).sample.chunk(2)
            x = scheduler.step(noise_uncond + scale * (noise_text - noise_uncond), t, x).prev_sample
    assert (ours - x).abs().max().item() <= 1e-6
    # and the same call on hand-made embeddings agrees bit for bit
    again = pipe(
        prompt_embeds=text[:1],
        negative_prompt_embeds=uncond[:1],
        guidance_scale=scale,
        latents=x_T,
        num_inference_steps=steps,
        output_type="latent",
        progress=False,
    ).images
    assert torch.equal(ours, again)


def test_a_prompt_list_sets_the_batch_and_num_images_per_prompt_groups_each_prompts_images():
    """diffusers' convention: P prompts give P images, or P * n with num_images_per_prompt=n,
    each prompt's images together (the same images as spelling every image's prompt out)."""
    pipe = _text_pipe()
    common = dict(num_inference_steps=3, guidance_scale=2.0, output_type="latent", progress=False)

    def gens(n):
        return [torch.Generator().manual_seed(k) for k in range(n)]

    assert pipe(prompt=["a red garment", "blue"], **common).images.shape[0] == 2
    grouped = pipe(prompt=["a red garment", "blue"], num_images_per_prompt=2, generator=gens(4), **common).images
    spelled = pipe(prompt=["a red garment", "a red garment", "blue", "blue"], generator=gens(4), **common).images
    assert grouped.shape[0] == 4 and torch.equal(grouped, spelled)
    embeds = pipe.encode_prompt(["red", "blue", "a garment"])[0]
    assert pipe(prompt_embeds=embeds, num_inference_steps=2, output_type="latent", progress=False).images.shape[0] == 3
    with pytest.raises(PPAPError, match="batch_size 3 disagrees with the 2 latents"):
        pipe(prompt="red", batch_size=3, latents=torch.randn(2, 1, 8, 8), num_inference_steps=2, progress=False)
    with pytest.raises(PPAPError, match="num_images_per_prompt must be >= 1, got 0"):
        pipe(prompt="red", num_images_per_prompt=0, num_inference_steps=2, progress=False)


def test_prompt_errors_are_one_line():
    pipe = _text_pipe()
    plain = PPAPPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    with pytest.raises(PPAPError, match="a prompt needs the pipeline's text_encoder and tokenizer"):
        plain(prompt="red", num_inference_steps=2, progress=False)
    embeds = pipe.encode_prompt("red")[0]
    with pytest.raises(PPAPError, match="give prompt or prompt_embeds, not both"):
        pipe(prompt="red", prompt_embeds=embeds, num_inference_steps=2, progress=False)
    with pytest.raises(PPAPError, match="negative_prompt needs a prompt"):
        pipe(prompt_embeds=embeds, negative_prompt="blue", num_inference_steps=2, progress=False)


def test_cli_prompt_equals_its_embeddings_in_a_file(tmp_path, capsys):
    from ppap.cli import main
    from ppap.io import atomic_save_safetensors

    pipe = _text_pipe()
    pipe.save_pretrained(tmp_path / "p")
    embeds, negative = pipe.encode_prompt("a red garment", "blue", do_classifier_free_guidance=True)
    atomic_save_safetensors(
        tmp_path / "e.safetensors", {"prompt_embeds": embeds[0].contiguous(), "negative_prompt_embeds": negative[0].contiguous()}
    )
    common = ["sample", "--diffusion", str(tmp_path / "p"), "--num", "3", "--steps", "3", "--cfg-scale", "3", "--method", "unguided"]
    common += ["--quiet"]
    assert main(common + ["--prompt", "a red garment", "--negative-prompt", "blue", "--out", str(tmp_path / "a.png")]) == 0
    assert main(common + ["--prompt-embeds", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "b.png")]) == 0
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    assert a.shape == (3, 8, 8, 1) and np.array_equal(a, b)
    capsys.readouterr()
    assert main(common + ["--negative-prompt", "blue", "--out", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "ppap: error: --negative-prompt needs --prompt"
