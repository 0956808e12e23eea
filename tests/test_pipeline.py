"""PPAPPipeline: the diffusers object a user meets first, on tiny random UNets of every kind."""

import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler
from PIL import Image

from ppap import Classification, LoRAExperts, PPAPError, PPAPPipeline, TimestepRouter, sample_ddim
from ppap.models import tiny_classifier

from conftest import tiny_cond_unet, tiny_unet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])


def _pipe(unet=None, **scheduler_options):
    return PPAPPipeline(unet=unet or tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100, **scheduler_options))


def test_loads_a_diffusers_ddpm_folder_and_round_trips(tmp_path):
    """A DDPMPipeline folder loads as a PPAPPipeline; save_pretrained / from_pretrained keep the images."""
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "ddpm")
    pipe = PPAPPipeline.from_pretrained(tmp_path / "ddpm")
    assert isinstance(pipe.scheduler, DDPMScheduler)
    first = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    assert first.images.shape == (2, 8, 8, 1) and first.images.min() >= 0 and first.images.max() <= 1
    private = tmp_path / "ppap" / "mine" / "private.safetensors"  # a user's own file in that folder
    private.parent.mkdir(parents=True)
    private.write_bytes(b"")
    private.chmod(0o600)
    os.utime(private, (0, 0))
    old_umask = os.umask(0o022)
    try:
        pipe.save_pretrained(tmp_path / "ppap")
    finally:
        os.umask(old_umask)
    weights = [w for w in sorted((tmp_path / "ppap").rglob("*.safetensors")) if w != private]
    assert weights and all(w.stat().st_mode & 0o777 == 0o644 for w in weights)  # not safetensors' 0600
    assert private.stat().st_mode & 0o777 == 0o600  # only what the save wrote
    private.unlink()
    again = PPAPPipeline.from_pretrained(tmp_path / "ppap")(
        batch_size=2, num_inference_steps=4, output_type="np", progress=False, generator=torch.Generator().manual_seed(0)
    )
    assert np.array_equal(first.images, again.images)
    pil = pipe(num_inference_steps=2, progress=False).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)


def test_the_zoo_ddpm_loads_with_from_pretrained():
    from ppap import zoo

    pipe = PPAPPipeline.from_pretrained(zoo.get("fashion-ddpm").location)
    out = pipe(batch_size=1, num_inference_steps=2, output_type="pt", progress=False, sampler="ddim").images
    assert out.shape == (1, 1, 32, 32) and 0 <= out.min() <= out.max() <= 1


def test_latents_generators_and_callback():
    pipe = _pipe()
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = pipe(latents=latents, num_inference_steps=5, output_type="latent", progress=False).images
    diffusion = pipe.diffusion
    assert torch.equal(ours, sample_ddim(diffusion, latents, diffusion.schedule.grid(5, "ddim")))
    # one generator per image gives each image its own noise: image 1 of a batch of 2 = image 0 of a batch of 1
    pair = pipe(
        batch_size=2,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        num_inference_steps=3,
        output_type="latent",
        progress=False,
    ).images
    single = pipe(
        batch_size=1, generator=[torch.Generator().manual_seed(8)], num_inference_steps=3, output_type="latent", progress=False
    ).images
    assert torch.allclose(pair[1], single[0], atol=1e-6)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, t))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 4 else None

    zeroed = pipe(latents=latents, num_inference_steps=5, output_type="latent", progress=False, callback_on_step_end=callback).images
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4] and torch.equal(zeroed, torch.zeros_like(zeroed))


@pytest.mark.parametrize("device", DEVICES)
def test_a_seed_gives_the_same_start_on_every_device(device, monkeypatch):
    """x_T is drawn on the CPU from the caller's generator and moved (diffusers' randn_tensor
    habit): the x_T the sampler receives on ``device`` equals the one drawn for the CPU, and
    equals the caller's generator's own draw."""
    import ppap.pipeline

    starts = []

    def record_start(denoiser, x_T, *args, **kwargs):  # the sampler's entry point: what it starts from
        starts.append(x_T)
        return x_T

    monkeypatch.setattr(ppap.pipeline, "sample", record_start)
    for where in (device, "cpu"):
        _pipe().to(where)(
            batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(3), progress=False, output_type="latent"
        )
    on_device, on_cpu = starts
    assert on_device.device.type == torch.device(device).type
    assert torch.equal(on_device.cpu(), on_cpu)
    assert torch.equal(on_cpu, torch.randn(on_cpu.shape, generator=torch.Generator().manual_seed(3)))


def test_bfloat16_unet_with_float32_guidance():
    pipe = _pipe()
    pipe.unet.to(torch.bfloat16)
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    dtypes = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            dtypes.append(x.dtype)
            return self.net(x)

    out = pipe(
        batch_size=2,
        num_inference_steps=3,
        guide=Spy(),
        target=3,
        output_type="latent",
        progress=False,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert dtypes and set(dtypes) == {torch.float32}


def _log_prob(net, x, target):
    with torch.no_grad():
        return net(x.clamp(-1, 1)).log_softmax(-1)[:, target]


def _bank():
    torch.manual_seed(0)
    return LoRAExperts(tiny_classifier(), TimestepRouter.uniform(2, 100))


@pytest.mark.parametrize("kind", ["class_labels", "prompt_embeds"])
def test_ppap_guidance_raises_the_target_on_conditional_unets(kind):
    """The paper's GLIDE / IF setting in miniature: a conditional UNet (class labels; or text
    embeddings with classifier-free guidance), guided by a PPAP expert bank. The final samples'
    target log-probability under the guide rises against the same latents unguided (both steps
    from the clipped model output, as guided DDIM steps are)."""
    if kind == "class_labels":
        pipe, cond = _pipe(tiny_unet(num_class_embeds=3)), {"class_labels": [0, 1, 2, 0]}
    else:
        pipe = _pipe(tiny_cond_unet())
        embeds = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(2))
        cond = {"prompt_embeds": embeds, "guidance_scale": 3.0}
    bank = _bank().eval()
    bank.task = Classification(10)
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    common = dict(latents=latents, num_inference_steps=6, output_type="latent", progress=False, use_clipped_model_output=True, **cond)
    plain = pipe(**common).images
    guided = pipe(guide=bank.guide, experts=bank, target=7, classifier_scale=20.0, **common).images
    assert not torch.equal(plain, guided)
    assert (_log_prob(bank.teacher, guided, 7) > _log_prob(bank.teacher, plain, 7)).all()


def test_bad_calls_are_one_line_errors():
    pipe = _pipe(tiny_unet(num_class_embeds=3))
    cases = [
        (dict(output_type="jpeg"), "unknown output_type 'jpeg'"),
        (dict(batch_size=2, generator=[torch.Generator()]), "1 generators for a batch of 2"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), "latents have shape [1, 3, 8, 8]"),
        (dict(class_labels=[5]), "class_labels 5 is out of range: the UNet has 3 class embeddings"),
        (dict(class_labels=[1], guidance_scale=2.0), "needs prompt_embeds or negative_class_labels"),
        (dict(eta=float("nan")), "eta must be a finite number"),
        (dict(guide=tiny_classifier(), target=12), "class index 12 is out of range"),
        (dict(method="ppap", guide=tiny_classifier()), "method 'ppap' needs --experts"),
        (dict(num_inference_steps=0), "number of sampling steps 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PPAPError) as e:
            pipe(progress=False, **({"class_labels": [0]} | kwargs))
        assert message in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))


def test_learned_variance_v_prediction_trailing_folder_through_the_cli(tmp_path, capsys):
    """The IF-like configuration end to end from the command line: generate, train, sample."""
    from safetensors.torch import save_file

    from ppap.cli import main

    folder = tmp_path / "model"
    scheduler = DDPMScheduler(
        num_train_timesteps=100, prediction_type="v_prediction", timestep_spacing="trailing", variance_type="learned_range"
    )
    DDPMPipeline(unet=tiny_unet(out_channels=2), scheduler=scheduler).save_pretrained(folder)
    torch.manual_seed(1)
    save_file(tiny_classifier().state_dict(), str(tmp_path / "clf.safetensors"))
    guide = ["--guide", "ppap.models:tiny_classifier", "--guide-weights", str(tmp_path / "clf.safetensors")]

    def run(argv):
        code = main(["--threads", "1"] + argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    run(
        [
            "generate",
            "--diffusion",
            str(folder),
            "--out",
            str(tmp_path / "corpus"),
            "--num",
            "24",
            "--steps",
            "4",
            "--sampler",
            "ddpm",
            "--quiet",
        ]
    )
    run(
        [
            "train",
            "--diffusion",
            str(folder),
            *guide,
            "--data",
            str(tmp_path / "corpus"),
            "--out",
            str(tmp_path / "experts"),
            "--experts",
            "2",
            "--iterations",
            "3",
            "--batch-size",
            "8",
            "--quiet",
        ]
    )
    for sampler in ("ddpm", "ddim"):
        run(
            [
                "sample",
                "--diffusion",
                str(folder),
                *guide,
                "--experts",
                str(tmp_path / "experts"),
                "--target",
                "2",
                "--num",
                "3",
                "--steps",
                "4",
                "--sampler",
                sampler,
                "--out",
                str(tmp_path / f"{sampler}.png"),
                "--quiet",
            ]
        )
        images = np.load(tmp_path / f"{sampler}.npz")["images"]
        assert images.shape == (3, 8, 8, 1) and images.std() > 0


def test_diffusion_is_one_object_until_the_unet_or_scheduler_is_replaced():
    pipe = _pipe()
    first = pipe.diffusion
    assert pipe.diffusion is first and pipe.diffusion.unet is pipe.unet
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, beta_schedule="squaredcos_cap_v2")
    second = pipe.diffusion
    assert second is not first and pipe.diffusion is second
    assert torch.equal(second.schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.double())
    pipe.unet = tiny_unet(seed=1)
    third = pipe.diffusion
    assert third is not second and third.unet is pipe.unet


def _dense_guide():
    from ppap import GuideModel
    from ppap.models import tiny_dense

    torch.manual_seed(0)
    return GuideModel(tiny_dense(1), task="dense")


def test_call_leaves_the_callers_modules_as_they_came():
    """A plain net (wrapped in a GuideModel inside) and a bank in train mode with trainable
    weights: after naive, x0 and PPAP calls, their modes and requires_grad are as given."""
    pipe = _pipe()
    torch.manual_seed(0)
    net = tiny_classifier().train()
    bank = _bank().train()
    bank.task = Classification(10)
    before = [([m.training for m in x.modules()], [p.requires_grad for p in x.parameters()]) for x in (net, bank)]
    assert any(before[0][1]) and any(before[1][1])
    common = dict(batch_size=2, num_inference_steps=2, target=1, output_type="latent", progress=False)
    pipe(guide=net, method="naive", **common)
    pipe(guide=net, method="x0", **common)
    pipe(guide=bank.guide, experts=bank, method="ppap", **common)
    after = [([m.training for m in x.modules()], [p.requires_grad for p in x.parameters()]) for x in (net, bank)]
    assert after == before


def test_a_guide_on_another_device_is_a_one_line_error_and_is_not_moved():
    pipe = _pipe()
    torch.manual_seed(0)
    guide = tiny_classifier().eval().to("meta")
    with pytest.raises(PPAPError) as e:
        pipe(guide=guide, target=1, num_inference_steps=2, progress=False)
    message = str(e.value)
    assert "meta" in message and "cpu" in message and "\n" not in message, message
    assert next(guide.parameters()).device.type == "meta"


def test_a_guide_may_be_given_by_reference_as_experts_may(tmp_path):
    """``guide=`` and ``experts=`` take a folder, zoo name or hub id, loaded as ``load_guide`` and
    ``load_experts`` load them; a guide that is neither a module nor a reference is a one-line error."""
    from transformers import ViTImageProcessor

    from ppap.loading import load_guide

    from tiny_hf import tiny_vit

    tiny_vit().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    pipe = _pipe()
    common = dict(batch_size=2, num_inference_steps=2, target=3, classifier_scale=30.0, output_type="latent", progress=False)
    by_module = pipe(guide=load_guide(str(tmp_path / "vit")), generator=torch.Generator().manual_seed(0), **common).images
    for ref in (str(tmp_path / "vit"), tmp_path / "vit"):
        assert torch.equal(pipe(guide=ref, generator=torch.Generator().manual_seed(0), **common).images, by_module)
    with pytest.raises(PPAPError, match="^guide must be an nn.Module, a folder, a zoo name or a hub id, got int$"):
        pipe(guide=3, **common)
    # a zoo name for both, as on the command line: the same images as the loaded models give
    import copy

    from ppap.loading import load_experts, load_pipeline

    zoo_pipe = load_pipeline("fashion-ddpm")
    guide = load_guide("fashion-classifier")
    bank = load_experts("fashion-ppap5", copy.deepcopy(guide), zoo_pipe.diffusion)
    common = dict(batch_size=2, num_inference_steps=2, target=[7, 8], output_type="latent", progress=False)
    loaded = zoo_pipe(guide=guide, experts=bank, generator=torch.Generator().manual_seed(0), **common).images
    named = zoo_pipe(guide="fashion-classifier", experts="fashion-ppap5", generator=torch.Generator().manual_seed(0), **common).images
    assert torch.equal(named, loaded)


def test_a_bank_brings_its_own_guide():
    pipe = _pipe()
    bank = _bank().eval()
    bank.task = Classification(10)
    common = dict(batch_size=2, num_inference_steps=3, target=4, classifier_scale=20.0, output_type="latent", progress=False)
    with_guide = pipe(guide=bank.guide, experts=bank, method="ppap", generator=torch.Generator().manual_seed(0), **common).images
    bank_only = pipe(experts=bank, method="ppap", generator=torch.Generator().manual_seed(0), **common).images
    assert torch.equal(bank_only, with_guide)
    assert pipe.guidance_term(2, experts=bank).method == "ppap"
    with pytest.raises(PPAPError, match="needs a guide"):  # a bank's adapted net is no naive guide
        pipe.guidance_term(2, experts=bank, method="naive")


def test_default_scale_follows_the_task_and_the_method():
    from ppap import DenseRegression, GuideModel, zoo
    from ppap.config import DEFAULT_SCALES, default_scale, describe_default_scales

    pipe = _pipe()
    documented = " ".join((PPAPPipeline.__doc__ or "").split())
    assert all(part in documented for part in describe_default_scales().split("; "))  # the docstring shows the table
    # the grey zoo's banks' recorded scales are the table's PPAP entries for their tasks (the
    # benches chose both); the colour banks record the colour bench's own choice
    for entry in (e for e in zoo.ZOO.values() if e.kind == "experts" and not e.name.startswith("fashion-rgb-")):
        assert entry.scale == DEFAULT_SCALES[(entry.task, "ppap")], entry.name
    torch.manual_seed(0)
    classifier = tiny_classifier().eval()
    assert pipe.guidance_term(2, guide=classifier, method="x0", target=1).scale == DEFAULT_SCALES[("classification", "x0")]
    dense = _dense_guide()
    target = torch.rand(2, 1, 8, 8)
    for method in ("naive", "x0", "x0-shortcut"):
        term = pipe.guidance_term(2, guide=dense, method=method, target=target)
        assert term.scale == default_scale("dense", method) >= 100 * DEFAULT_SCALES[("classification", "ppap")], method
    bank = LoRAExperts(GuideModel(_dense_guide().net, task="dense"), TimestepRouter.uniform(2, 100))
    bank.task, bank.default_scale = DenseRegression("l1"), None
    assert pipe.guidance_term(2, experts=bank, target=target).scale == DEFAULT_SCALES[("dense", "ppap")]
    bank.default_scale = 123.0  # a bank's own recorded scale: for the expert methods only
    assert pipe.guidance_term(2, experts=bank, target=target).scale == 123.0
    assert pipe.guidance_term(2, guide=dense, experts=bank, method="x0", target=target).scale == DEFAULT_SCALES[("dense", "x0")]


def test_task_is_accepted_by_call():
    pipe = _pipe()
    net = _dense_guide().net  # a plain dense net: its [B, 1, H, W] output is a dense map only when the task says so
    common = dict(batch_size=2, num_inference_steps=2, output_type="latent", progress=False)
    out = pipe(guide=net, task="dense", target=torch.rand(2, 1, 8, 8), **common).images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(PPAPError, match="not class logits"):  # without it: read as a classifier
        pipe(guide=net, target=1, **common)


def test_progress_bar_follows_set_progress_bar_config(capsys):
    pipe = _pipe()
    pipe.set_progress_bar_config(desc="ppap-steps")
    pipe(num_inference_steps=3, output_type="latent")
    assert "ppap-steps" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(num_inference_steps=3, output_type="latent")
    assert capsys.readouterr().err == ""


def test_callback_tensor_inputs_and_diffusers_callback_objects():
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    pipe = _pipe()
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    seen = []

    def record(p, i, t, kwargs):
        seen.append({k: (None if v is None else tuple(v.shape)) for k, v in kwargs.items()})

    common = dict(batch_size=2, num_inference_steps=3, output_type="latent", progress=False)
    pipe(guide=net, target=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "x0", "guidance"], **common)
    assert seen == [{"latents": (2, 1, 8, 8), "x0": (2, 1, 8, 8), "guidance": (2, 1, 8, 8)}] * 3
    seen.clear()
    pipe(callback_on_step_end=record, **common)  # default: the latents only
    assert seen == [{"latents": (2, 1, 8, 8)}] * 3
    with pytest.raises(PPAPError) as e:
        pipe(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **common)
    assert "'prompt_embeds'" in str(e.value) and "latents, x0, guidance" in str(e.value) and "\n" not in str(e.value)

    class ZeroAtCutoff(PipelineCallback):  # diffusers' callback objects: their tensor_inputs set the inputs
        tensor_inputs = ["latents", "x0"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            index, ratio = self.config.cutoff_step_index, self.config.cutoff_step_ratio
            cutoff = index if index is not None else int(pipeline.num_timesteps * ratio)  # as diffusers' cut-off callbacks
            seen.append((step_index, sorted(callback_kwargs)))
            if step_index == cutoff:
                callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
            return callback_kwargs

    common["num_inference_steps"] = 4
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = pipe(latents=latents, **common).images
    outs = []
    for callback in (
        ZeroAtCutoff(cutoff_step_ratio=0.5),
        MultiPipelineCallbacks([ZeroAtCutoff(cutoff_step_ratio=None, cutoff_step_index=2)]),
    ):
        seen.clear()
        outs.append(pipe(latents=latents, callback_on_step_end=callback, **common).images)
        assert seen == [(i, ["latents", "x0"]) for i in range(4)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], plain)  # both zeroed the sample after step 2 of 4


def test_a_cli_error_mid_run_is_the_last_line_on_stderr(tiny_models, capsys):
    """The progress bars are closed before the one-line error is printed, not redrawn after it."""
    from ppap.cli import main

    m = tiny_models
    argv = ["sample", "--diffusion", m["diffusion"], "--guide", m["guide"], "--guide-weights", m["weights"]]
    argv += ["--method", "naive", "--scale", "1e30", "--num", "4", "--batch-size", "2", "--steps", "3"]
    code = main(["--threads", "1"] + argv + ["--out", str(m["root"] / "s.png")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]  # splitlines also splits a bar's carriage returns
    assert code == 2 and lines[-1].startswith("ppap: error: naive") and "non-finite" in lines[-1], err
    assert "0/4" in err  # the bar was shown before the error
    assert not (m["root"] / "s.png").exists()
