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


def test_eps_x0_conversions_are_inverse():
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    x_t, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x0 = schedule.eps_to_x0(x_t, t, eps)
    assert torch.allclose(schedule.x0_to_eps(x_t, t, x0), eps, atol=1e-4)
    # q_sample of the predicted x0 with the same eps gives back x_t
    assert torch.allclose(schedule.q_sample(x0, t, eps), x_t, atol=1e-4)
    assert torch.allclose(schedule.sigma(t), ((1 - schedule.alphas_cumprod[t]) / schedule.alphas_cumprod[t]).sqrt())


@pytest.mark.parametrize("steps,spacing", [(25, "leading"), (10, "trailing"), (1000, "leading")])
def test_timesteps_match_diffusers_ddim(steps, spacing):
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    schedule = NoiseSchedule.from_diffusers(sched)
    assert torch.equal(schedule.timesteps(steps, spacing), sched.timesteps.long())


def test_v_prediction_is_refused_clearly():
    with pytest.raises(PPAPError, match="prediction_type 'v_prediction' is not supported"):
        NoiseSchedule.from_diffusers(DDPMScheduler(prediction_type="v_prediction"))


def test_out_of_range_timestep_and_steps():
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(PPAPError, match="timestep 100 is outside"):
        schedule.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([100]), torch.zeros(1, 1, 2, 2))
    with pytest.raises(PPAPError, match="sampling steps 0"):
        schedule.timesteps(0)
