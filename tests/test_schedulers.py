"""The generic scheduler loop (``ppap.schedulers``): unguided it is diffusers' own denoising loop
bit for bit, guided by every method it raises the target, the pipeline samples with the scheduler
it holds or the one named, and what ppap cannot guide is a one-line error."""

import inspect

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ppap import Classification, Diffusion, LoRAExperts, NoiseSchedule, PPAPError, PPAPPipeline, TimestepRouter, sample_scheduler
from ppap.models import tiny_classifier
from ppap.schedulers import GENERIC_SCHEDULERS, OWN_LOOPS, SAMPLER_NAMES, sample

from conftest import tiny_unet


def _diffusers_loop(unet, scheduler, x_T, steps, generator=None):
    """diffusers' own denoising loop (its pipelines' ``for t in timesteps`` without CFG)."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(steps)
    x = x_T * s.init_noise_sigma
    kwargs = {"generator": generator} if "generator" in inspect.signature(s.step).parameters else {}
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(unet(s.scale_model_input(x, t), t).sample, t, x, **kwargs).prev_sample
    return x


PARITY_CASES = [(name, kind, {}) for name in GENERIC_SCHEDULERS for kind in ("epsilon", "v_prediction")] + [
    ("DPMSolverMultistepScheduler", "epsilon", {"use_karras_sigmas": True, "solver_order": 3}),
    ("DPMSolverMultistepScheduler", "v_prediction", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", "epsilon", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", "v_prediction", {"timestep_spacing": "trailing", "solver_order": 3}),
    ("EulerDiscreteScheduler", "v_prediction", {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", "sample", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("HeunDiscreteScheduler", "epsilon", {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(OWN_LOOPS))
def test_ddim_and_ddpm_own_loops_equal_diffusers_own_loop(name, prediction_type):
    """``sample`` runs DDIMScheduler / DDPMScheduler through ppap's own DDIM / DDPM loops: bit
    for bit diffusers' loop with that scheduler (DDPM's noise from the same generator)."""
    scheduler = getattr(diffusers, name)(num_train_timesteps=1000, prediction_type=prediction_type)
    unet = tiny_unet()
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_loop(unet, scheduler, x_T, 10, torch.Generator().manual_seed(1))
    ours = sample(diffusion, x_T, scheduler, 10, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ref).all() and not torch.equal(ref, x_T)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name,prediction_type,options", PARITY_CASES, ids=[f"{n}-{k}-{i}" for i, (n, k, _) in enumerate(PARITY_CASES)])
def test_unguided_equals_diffusers_own_loop(name, prediction_type, options):
    scheduler = getattr(diffusers, name)(num_train_timesteps=1000, prediction_type=prediction_type, **options)
    unet = tiny_unet()
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_loop(unet, scheduler, x_T, 6, torch.Generator().manual_seed(1))
    before = (scheduler.num_inference_steps, scheduler.timesteps.clone())
    ours = sample_scheduler(diffusion, x_T, scheduler, 6, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ref).all()
    assert torch.equal(ours, ref)
    # the caller's scheduler is untouched (a fresh copy ran)
    assert scheduler.num_inference_steps == before[0] and torch.equal(scheduler.timesteps, before[1])


@pytest.mark.parametrize("name", GENERIC_SCHEDULERS)
def test_pipeline_samples_with_its_own_scheduler_class(name):
    """Without ``sampler`` the pipeline samples as diffusers does with the scheduler it holds
    (Euler and UniPC used to sample DDIM silently; DPM-Solver was refused)."""
    unet = tiny_unet()
    scheduler = getattr(diffusers, name)(num_train_timesteps=100)
    pipe = PPAPPipeline(unet=unet, scheduler=scheduler)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = pipe(latents=latents, num_inference_steps=5, output_type="latent", progress=False, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out.images, _diffusers_loop(unet, scheduler, latents, 5, torch.Generator().manual_seed(4)))


def test_a_named_sampler_is_built_from_the_registered_config():
    unet = tiny_unet()
    registered = EulerDiscreteScheduler(num_train_timesteps=100, prediction_type="v_prediction", timestep_spacing="trailing")
    pipe = PPAPPipeline(unet=unet, scheduler=registered)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    run = lambda sampler: pipe(latents=latents, num_inference_steps=5, output_type="latent", progress=False, sampler=sampler).images  # noqa: E731
    dpm = DPMSolverMultistepScheduler.from_config(registered.config, algorithm_type="dpmsolver++")
    assert dpm.config.prediction_type == "v_prediction" and dpm.config.timestep_spacing == "trailing"
    assert torch.equal(run("dpm++"), _diffusers_loop(unet, dpm, latents, 5))
    ddim = _diffusers_loop(unet, DDIMScheduler.from_config(registered.config), latents, 5)
    assert (run("ddim") - ddim).abs().max().item() < 1e-5  # ppap's own DDIM loop
    assert set(SAMPLER_NAMES) == {"ddim", "ddpm", "dpm++", "unipc", "euler", "euler-a", "heun"}


def _log_prob(net, x, target):
    with torch.no_grad():
        return net(x.clamp(-1, 1)).log_softmax(-1)[torch.arange(len(target)), target]


@pytest.mark.parametrize("method", ["naive", "ppap", "x0", "x0-shortcut"])
@pytest.mark.parametrize("sampler", [name for name in SAMPLER_NAMES if name not in ("ddim", "ddpm")])
def test_every_method_guides_every_scheduler(sampler, method):
    """Same latents and noise, guided and not: the guided samples are more likely to be the target
    under the guiding classifier (x0 needs the UNet forward with grad: its guided_prediction)."""
    pipe = PPAPPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))
    torch.manual_seed(0)
    bank = LoRAExperts(tiny_classifier(), TimestepRouter.uniform(2, 100)).eval()
    bank.task = Classification(10)
    target = torch.tensor([1, 4, 7, 9])
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    common = dict(latents=latents, num_inference_steps=4, output_type="latent", progress=False, sampler=sampler)
    gen = lambda: torch.Generator().manual_seed(6)  # noqa: E731
    plain = pipe(generator=gen(), **common).images
    experts = bank if method == "ppap" else None
    guided = pipe(generator=gen(), guide=bank.guide, experts=experts, method=method, target=target, classifier_scale=20.0, **common).images
    assert torch.isfinite(guided).all()
    assert (_log_prob(bank.teacher, guided, target) > _log_prob(bank.teacher, plain, target)).all()


def test_schedulers_ppap_cannot_guide_are_one_line_errors():
    unet = tiny_unet()
    cases = [
        (diffusers.LCMScheduler(num_train_timesteps=100), {}, "LCMScheduler cannot be guided by ppap"),
        (diffusers.FlowMatchEulerDiscreteScheduler(), {}, "FlowMatchEulerDiscreteScheduler cannot be guided by ppap"),
        (DDIMScheduler(num_train_timesteps=100), {"sampler": "lms"}, "unknown sampler 'lms'; valid: ddim, ddpm, dpm++, unipc"),
        (
            DPMSolverMultistepScheduler(num_train_timesteps=100, thresholding=True),
            {},
            "DPMSolverMultistepScheduler: scheduler option thresholding",
        ),
        (
            EulerDiscreteScheduler(num_train_timesteps=100, timestep_type="continuous", prediction_type="v_prediction"),
            {},
            "EulerDiscreteScheduler option timestep_type='continuous' is not supported",
        ),
        (
            DPMSolverMultistepScheduler(num_train_timesteps=100),
            {"num_inference_steps": 101},
            "number of sampling steps 101 must be in [1, 100]",
        ),
    ]
    for scheduler, kwargs, message in cases:
        pipe = PPAPPipeline(unet=unet, scheduler=scheduler)
        with pytest.raises(PPAPError) as e:
            pipe(progress=False, **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_load_pipeline_loads_the_saved_scheduler_class(tmp_path):
    """As diffusers' from_pretrained: the folder's scheduler class, not always a DDPMScheduler."""
    from ppap.loading import load_pipeline

    saved = diffusers.UniPCMultistepScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    PPAPPipeline(unet=tiny_unet(), scheduler=saved).save_pretrained(tmp_path / "unipc")
    pipe = load_pipeline(str(tmp_path / "unipc"))
    assert type(pipe.scheduler) is diffusers.UniPCMultistepScheduler
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_cli_samples_with_a_named_sampler(tiny_models, tmp_path, capsys):
    """``ppap sample --sampler NAME``; the help lists every name; a bad one is ppap's one-line error."""
    from ppap.cli import SAMPLER_HELP, main

    assert all(name in SAMPLER_HELP for name in SAMPLER_NAMES)
    m = tiny_models
    argv = ["sample", "--diffusion", m["diffusion"], "--guide", m["guide"], "--guide-weights", m["weights"], "--method", "naive"]
    argv += ["--target", "3", "--num", "2", "--steps", "3", "--out", str(tmp_path / "g.png"), "--quiet", "--sampler"]
    assert main(argv + ["heun"]) == 0, capsys.readouterr().err
    images = np.load(tmp_path / "g.npz")["images"]
    assert images.shape == (2, 8, 8, 1) and images.std() > 0
    assert main(argv + ["lms"]) == 2
    assert "ppap: error: unknown sampler 'lms'; valid: ddim, ddpm, dpm++" in capsys.readouterr().err


def test_dpm_solver_on_a_learned_variance_model_of_any_channel_count():
    """A 4-channel learned-variance UNet (8 outputs) with DPM-Solver++ built from its DDPM config:
    the prediction channels are what the solver steps (diffusers' own slice keeps 3 channels)."""
    unet = tiny_unet(in_channels=4, out_channels=8)
    pipe = PPAPPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100, variance_type="learned_range"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = pipe(latents=latents, num_inference_steps=4, output_type="latent", progress=False, sampler="dpm++").images
    s = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++", variance_type=None)
    s.set_timesteps(4)
    x = latents.clone()
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(unet(x, t).sample[:, :4], t, x).prev_sample
    assert torch.equal(out, x)
