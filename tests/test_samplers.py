import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ppap import Classification, NoisyInputGuide, sample_ddim, sample_ddpm
from ppap.models import tiny_classifier


def _diffusers_loop(diffusion, scheduler, x_T, steps, generator, **step_kwargs):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = diffusion.unet(x, t).sample
            x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def _diffusion_1000(beta_schedule):
    from conftest import tiny_unet

    from ppap import Diffusion, NoiseSchedule

    return Diffusion(tiny_unet(), NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)))


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(beta_schedule, eta):
    """25 of 1000 steps, same model, same x_T, same timesteps (and the same generator for eta > 0)."""
    diffusion = _diffusion_1000(beta_schedule)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_loop(diffusion, DDIMScheduler.from_config(diffusion.schedule.config), x_T, 25,
                          torch.Generator().manual_seed(1), eta=eta)
    ours = sample_ddim(diffusion, x_T, diffusion.schedule.timesteps(25), eta=eta, generator=torch.Generator().manual_seed(1))
    assert (ours - ref).abs().max().item() < 1e-5


def test_ddpm_matches_diffusers():
    diffusion = _diffusion_1000("linear")
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_loop(diffusion, DDPMScheduler.from_config(diffusion.schedule.config), x_T, 50, torch.Generator().manual_seed(1))
    ours = sample_ddpm(diffusion, x_T, diffusion.schedule.timesteps(50), generator=torch.Generator().manual_seed(1))
    assert (ours - ref).abs().max().item() < 1e-5


def _log_prob(net, x, y):
    with torch.no_grad():
        return net(x).log_softmax(-1)[torch.arange(len(y)), y]


@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("steps", [slice(3, 5), slice(0, 2)])  # a mid-noise and the noisiest step
@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm])
def test_guided_step_raises_target_log_probability(sampler, steps, clip_x0):
    """One step from the same x_t with and without guidance: the guided x_{t-1} is more likely
    to be the target class under the guiding model, for every sample. With x0 clipping at high
    noise this caught guidance acting in reverse (the clip cancelled the x0 part of eps_hat)."""
    diffusion = _diffusion_1000("linear")
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    y = torch.tensor([0, 3, 5, 9])
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = diffusion.schedule.timesteps(10)[steps]  # the step t[0] -> t[1] is compared
    guide = NoisyInputGuide(lambda x, _t: net(x), Classification(10), y, scale=2.0)
    after_first = {}

    def run(guide, key):
        sampler(diffusion, x_t, t, guide=guide, clip_x0=clip_x0, generator=torch.Generator().manual_seed(3),
                callback=lambda d: after_first.setdefault(key, d["x"]))

    run(None, "plain")
    run(guide, "guided")
    assert (_log_prob(net, after_first["guided"], y) > _log_prob(net, after_first["plain"], y)).all()


def test_ddpm_guidance_is_variance_times_gradient(tiny_diffusion):
    """Dhariwal & Nichol Algorithm 1: the guided mean is mu + Sigma * s * grad."""
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    y = torch.tensor([1, 2])
    x_t = torch.randn(2, 1, 8, 8)
    steps = tiny_diffusion.schedule.timesteps(10)
    guide = NoisyInputGuide(lambda x, _t: net(x), Classification(10), y, scale=3.0)
    seen = {}

    def first_step(key, **kw):
        sample_ddpm(tiny_diffusion, x_t, steps[:2], generator=torch.Generator().manual_seed(0),
                    callback=lambda d: seen.setdefault(key, d), **kw)
        return seen[key]

    plain, guided = first_step("plain"), first_step("guided", guide=guide)
    a = tiny_diffusion.schedule.alphas_cumprod
    a_t, a_prev = a[steps[0]], a[steps[1]]
    var = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).float()
    assert guided["guidance"].abs().sum() > 0
    assert torch.allclose(guided["x"] - plain["x"], var * guided["guidance"], atol=1e-6)
