import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ppap import NoiseSchedule, PPAPError


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_q_sample_equals_diffusers_add_noise(beta_schedule):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    schedule = NoiseSchedule.from_diffusers(sched)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    ours = schedule.q_sample(x0, t, noise)
    theirs = sched.add_noise(x0, noise, t)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert torch.equal(schedule.alphas_cumprod.float(), sched.alphas_cumprod)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_model_output_gives_back_the_noise_and_the_clean_image(prediction_type):
    """``to_prediction`` inverts q_sample for each prediction type; the v target is diffusers' own
    (``DDPMScheduler.get_velocity``)."""
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    schedule = NoiseSchedule.from_diffusers(sched)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = schedule.q_sample(x0, t, eps)
    output = {"epsilon": eps, "sample": x0, "v_prediction": sched.get_velocity(x0, eps, t)}[prediction_type]
    got_eps, got_x0 = schedule.to_prediction(x_t, t, output)
    atol = 2e-2 if prediction_type == "epsilon" else 1e-4  # x0 from eps divides by sqrt(abar_999) ~ 0.006
    assert torch.allclose(got_eps, eps, atol=1e-3) and torch.allclose(got_x0, x0, atol=atol)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize(
    "steps,spacing,offset", [(25, "leading", 0), (25, "leading", 1), (10, "trailing", 0), (7, "linspace", 0), (1000, "leading", 0)]
)
def test_timesteps_follow_the_scheduler_config(kind, steps, spacing, offset):
    """The grid is the scheduler's own: its spacing and steps_offset, not ppap's choice."""
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    schedule = NoiseSchedule.from_diffusers(sched)
    assert torch.equal(schedule.grid(steps, kind).timesteps, sched.timesteps.long())


def test_final_alpha_follows_set_alpha_to_one():
    for flag, final in ((True, 1.0), (False, None)):
        schedule = NoiseSchedule.from_diffusers(DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=flag))
        grid = schedule.grid(10, "ddim")
        assert grid.abar_prev[-1].item() == (final if final is not None else schedule.alphas_cumprod[0].item())
        assert schedule.grid(10, "ddpm").abar_prev[-1].item() == 1.0  # DDPMScheduler always ends at alpha 1


def test_unknown_prediction_type_is_refused_clearly():
    sched = DDPMScheduler()
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(PPAPError, match="prediction_type='flow' is not supported"):
        NoiseSchedule.from_diffusers(sched)


def test_out_of_range_timestep_and_steps():
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(PPAPError, match="timestep 100 is outside"):
        schedule.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([100]), torch.zeros(1, 1, 2, 2))
    with pytest.raises(PPAPError, match="sampling steps 0"):
        schedule.grid(0)


def test_schedulers_without_variance_are_accepted():
    """DPMSolverMultistepScheduler's variance_type is None: no variance, not a bad option."""
    from diffusers import DPMSolverMultistepScheduler

    schedule = NoiseSchedule.from_diffusers(DPMSolverMultistepScheduler(num_train_timesteps=1000))
    assert schedule.variance_type == "fixed_small"
    with pytest.raises(PPAPError, match="variance_type='fixed_large_log' is not supported"):
        NoiseSchedule.from_diffusers(DPMSolverMultistepScheduler(variance_type="fixed_large_log"))


def test_fractional_timesteps_interpolate_abar_in_log_sigma():
    """A float t between the table's entries (Karras sigmas, Euler / Heun spacings): abar is the
    log-sigma interpolation, which gives back the Karras sigmas diffusers placed at those t; an
    integer-valued float t gives the table's own value."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    sched.set_timesteps(10)
    schedule = NoiseSchedule.from_diffusers(sched)
    assert not torch.equal(sched.timesteps, sched.timesteps.round())  # fractional
    abar = schedule.abar_at(sched.timesteps)
    assert torch.allclose(abar, 1 / (1 + sched.sigmas[:-1].double() ** 2), rtol=1e-4, atol=0)
    whole = torch.tensor([0.0, 17.0, 999.0])
    assert torch.equal(schedule.abar_at(whole), schedule.alphas_cumprod[[0, 17, 999]])
    assert torch.equal(schedule.abar(torch.tensor([17.0]), torch.zeros(1, 1, 2, 2)).flatten(), schedule.alphas_cumprod[[17]].float())
    with pytest.raises(PPAPError, match="timestep 999.5 is outside"):
        schedule.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([999.5]), torch.zeros(1, 1, 2, 2))
