"""Unguided ppap sampling equals diffusers' own scheduler loops, over the configurations the
paper's setting needs (prediction types, spacings, offsets, final alpha, clipping, learned
variance, class- and text-conditional UNets with classifier-free guidance)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ppap import Classification, Conditioning, Diffusion, NoiseSchedule, NoisyInputGuidance, sample_ddim, sample_ddpm
from ppap.models import tiny_classifier

from conftest import tiny_cond_unet, tiny_unet

BASE = dict(num_train_timesteps=1000, beta_schedule="linear")


def _reference_loop(unet, scheduler, x_T, steps, generator, channels, unet_kwargs=None, cfg_scale=1.0, negative=None, **step_kwargs):
    """The loop diffusers' pipelines run: DDPMPipeline / DDIMPipeline, with IFPipeline.__call__'s
    classifier-free guidance (the prediction channels combined, the conditional branch's learned
    variance kept) and its variance split (kept only for a learned variance_type)."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    kw = unet_kwargs or {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            if cfg_scale > 1:
                both = {k: torch.cat([negative[k], v]) for k, v in kw.items()}
                out_u, out_c = unet(torch.cat([x, x]), t, **both).sample.chunk(2)
                eps_u, eps_c, variance = out_u[:, :channels], out_c[:, :channels], out_c[:, channels:]
                out = torch.cat([eps_u + cfg_scale * (eps_c - eps_u), variance], dim=1)
            else:
                out = unet(x, t, **kw).sample
            if scheduler.config.get("variance_type") not in ("learned", "learned_range"):
                out = out[:, :channels]
            x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


DDIM_CASES = [  # (scheduler options, eta, out_channels)
    ({}, 0.0, 1),
    ({}, 0.7, 1),
    ({"beta_schedule": "squaredcos_cap_v2"}, 0.0, 1),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.0, 1),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "clip_sample": False}, 0.0, 1),
    ({"prediction_type": "sample", "timestep_spacing": "linspace"}, 0.5, 1),
    ({"steps_offset": 1, "set_alpha_to_one": False}, 0.0, 1),
    ({"clip_sample": False}, 0.3, 1),
    ({"clip_sample_range": 0.5, "timestep_spacing": "trailing"}, 0.0, 1),
    ({"prediction_type": "v_prediction", "timestep_spacing": "linspace", "steps_offset": 1}, 0.0, 2),  # learned-variance UNet
]


@pytest.mark.parametrize("options,eta,out_channels", DDIM_CASES, ids=[str(i) for i in range(len(DDIM_CASES))])
def test_ddim_matches_diffusers(options, eta, out_channels):
    scheduler = DDIMScheduler(**(BASE | options))
    unet = tiny_unet(out_channels=out_channels)
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _reference_loop(unet, scheduler, x_T, 10, torch.Generator().manual_seed(1), 1, eta=eta)
    ours = sample_ddim(diffusion, x_T, diffusion.schedule.grid(10, "ddim"), eta=eta, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ref).all()
    assert (ours - ref).abs().max().item() < 1e-5


DDPM_CASES = [  # (scheduler options, out_channels)
    ({}, 1),
    ({"variance_type": "fixed_small_log", "timestep_spacing": "trailing"}, 1),
    ({"variance_type": "fixed_large", "prediction_type": "v_prediction"}, 1),
    ({"variance_type": "learned_range", "prediction_type": "epsilon", "timestep_spacing": "linspace"}, 2),
    ({"variance_type": "learned_range", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 2),
    ({"prediction_type": "sample", "steps_offset": 1, "clip_sample_range": 2.0}, 1),
]


@pytest.mark.parametrize("options,out_channels", DDPM_CASES, ids=[str(i) for i in range(len(DDPM_CASES))])
def test_ddpm_matches_diffusers(options, out_channels):
    scheduler = DDPMScheduler(**(BASE | options))
    unet = tiny_unet(out_channels=out_channels)
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _reference_loop(unet, scheduler, x_T, 12, torch.Generator().manual_seed(1), 1)
    ours = sample_ddpm(diffusion, x_T, diffusion.schedule.grid(12, "ddpm"), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ref).all()
    assert (ours - ref).abs().max().item() < 1e-5


def test_generator_lists_match_diffusers():
    """One CPU generator per sample (diffusers' randn_tensor habit) gives the same noise as diffusers."""
    scheduler = DDPMScheduler(**BASE)
    unet = tiny_unet()
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    ref = _reference_loop(unet, scheduler, x_T, 5, gens(), 1)
    ours = sample_ddpm(diffusion, x_T, diffusion.schedule.grid(5, "ddpm"), generator=gens())
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_class_conditional_unet_matches_diffusers(cfg_scale):
    """UNet2DModel with class embeddings; CFG with a null class (the DiT habit)."""
    scheduler = DDIMScheduler(**BASE, prediction_type="v_prediction", timestep_spacing="trailing")
    unet = tiny_unet(num_class_embeds=4)
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    labels, null = torch.tensor([0, 2, 1]), torch.tensor([3, 3, 3])
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _reference_loop(unet, scheduler, x_T, 8, None, 1, {"class_labels": labels}, cfg_scale, {"class_labels": null})
    cond = Conditioning(class_labels=labels, negative_class_labels=null if cfg_scale > 1 else None, guidance_scale=cfg_scale)
    ours = sample_ddim(diffusion.bind(cond), x_T, diffusion.schedule.grid(8, "ddim"))
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_text_conditional_unet_with_cfg_matches_diffusers(kind, cfg_scale):
    """UNet2DConditionModel with encoder_hidden_states, learned variance (IF-like), CFG as diffusers' pipelines do it."""
    opts = {"variance_type": "learned_range"} if kind == "ddpm" else {}
    scheduler = (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(**BASE, **opts)
    unet = tiny_cond_unet(out_channels=2)
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    embeds = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    negative = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5))
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _reference_loop(
        unet,
        scheduler,
        x_T,
        6,
        torch.Generator().manual_seed(1),
        1,
        {"encoder_hidden_states": embeds},
        cfg_scale,
        {"encoder_hidden_states": negative},
    )
    cond = Conditioning(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=cfg_scale)
    sampler = sample_ddpm if kind == "ddpm" else sample_ddim
    ours = sampler(diffusion.bind(cond), x_T, diffusion.schedule.grid(6, kind), generator=torch.Generator().manual_seed(1))
    assert (ours - ref).abs().max().item() < 1e-5


class PositiveVariance(torch.nn.Module):
    """A learned-variance UNet whose variance channels are positive, as a trained one's are
    (diffusers' variance_type "learned": the extra channels are the variance itself)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config

    def forward(self, x, t, **kwargs):
        out = self.unet(x, t, **kwargs).sample
        c = x.shape[1]
        return SimpleNamespace(sample=torch.cat([out[:, :c], 1e-3 * torch.nn.functional.softplus(4 * out[:, c:])], dim=1))


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_cfg_keeps_the_conditional_learned_variance(variance_type):
    """CFG at scale 5 on a learned-variance model combines only the prediction channels: the
    sample stays finite and equals diffusers' IF loop (combining the variance channels too drove
    "learned" variances negative, a NaN sample, and "learned_range" outside [beta_tilde, beta])."""
    scheduler = DDPMScheduler(**BASE, variance_type=variance_type)
    unet = PositiveVariance(tiny_unet(out_channels=2, num_class_embeds=4))
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
    labels, null = torch.tensor([0, 2, 1]), torch.tensor([3, 3, 3])
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    ref = _reference_loop(unet, scheduler, x_T, 10, gen(), 1, {"class_labels": labels}, 5.0, {"class_labels": null})
    cond = Conditioning(class_labels=labels, negative_class_labels=null, guidance_scale=5.0)
    ours = sample_ddpm(diffusion.bind(cond), x_T, diffusion.schedule.grid(10, "ddpm"), generator=gen())
    assert torch.isfinite(ref).all()
    assert (ours - ref).abs().max().item() < 1e-5


def _log_prob(net, x, y):
    with torch.no_grad():
        return net(x).log_softmax(-1)[torch.arange(len(y)), y]


@pytest.mark.parametrize(
    "prediction_type,clip_x0,steps",
    [  # slice(3, 5): a mid-noise step; slice(0, 2): the noisiest
        ("epsilon", False, slice(3, 5)),
        ("epsilon", True, slice(3, 5)),
        ("epsilon", False, slice(0, 2)),
        ("epsilon", True, slice(0, 2)),
        ("v_prediction", True, slice(0, 2)),
        ("sample", True, slice(3, 5)),
    ],
)
@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm])
def test_guided_step_raises_target_log_probability(sampler, steps, clip_x0, prediction_type):
    """One step from the same x_t with the guidance gradient and with a zero one: the guided
    x_{t-1} is more likely to be the target class under the guiding model, for every sample and
    every prediction type.
    With x0 clipping at high noise this caught guidance acting in reverse (the clip cancelled the
    x0 part of eps_hat)."""
    kind = "ddim" if sampler is sample_ddim else "ddpm"
    diffusion = Diffusion(tiny_unet(), NoiseSchedule.from_diffusers(DDPMScheduler(**BASE, prediction_type=prediction_type)))
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    y = torch.tensor([0, 3, 5, 9])
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    grid = diffusion.schedule.grid(10, kind)[steps]  # the step t[0] -> t[1] is compared
    guidance = NoisyInputGuidance(lambda x, _t: net(x), Classification(10), y, scale=2.0)
    after_first = {}

    def run(guidance, key):
        sampler(
            diffusion,
            x_t,
            grid,
            guidance=guidance,
            clip_x0=clip_x0,
            generator=torch.Generator().manual_seed(3),
            callback=lambda d: after_first.setdefault(key, d["x"]),
        )

    run(lambda x, _t, _pred: torch.zeros_like(x), "plain")  # the same guided step, with a zero gradient
    run(guidance, "guided")
    assert (_log_prob(net, after_first["guided"], y) > _log_prob(net, after_first["plain"], y)).all()


def test_guided_ddim_with_clipping_steps_from_the_clipped_x0():
    """With x0 clipping, a guided DDIM step is guided-diffusion's ddim_sample + condition_score
    (the official PPAP code's DDIM): eps re-derived from the clipped x0, eps_hat = eps -
    sqrt(1 - abar_t) g, x0 recomputed from eps_hat, then the DDIM update. Stepping from the raw
    eps instead washed a text prompt's colour out of guided samples."""
    diffusion = Diffusion(tiny_unet(), NoiseSchedule.from_diffusers(DDPMScheduler(**BASE)))
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    y = torch.tensor([0, 3, 5, 9])
    x_t = 3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))  # far off the data: its x0 is clipped
    grid = diffusion.schedule.grid(10, "ddim")[3:5]
    seen = {}
    guidance = NoisyInputGuidance(lambda x, _t: net(x), Classification(10), y, scale=2.0)
    ours = sample_ddim(diffusion, x_t, grid, guidance=guidance, clip_x0=True, callback=lambda d: seen.setdefault("first", d))
    a_t, a_prev = grid.abar[0].float(), grid.abar_prev[0].float()
    with torch.no_grad():
        pred = diffusion(x_t, torch.full((4,), int(grid.timesteps[0])))
    assert (pred.x0.abs() > 1).float().mean() > 0.05  # the clip matters here
    x0 = pred.x0.clamp(-1, 1)
    eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    g = seen["first"]["guidance"]
    assert g.abs().sum() > 0
    eps_hat = eps - (1 - a_t) ** 0.5 * g
    x0_hat = (x_t - (1 - a_t) ** 0.5 * eps_hat) / a_t**0.5
    expected = a_prev**0.5 * x0_hat + (1 - a_prev) ** 0.5 * eps_hat
    assert torch.allclose(seen["first"]["x"], expected, atol=1e-5)
    assert torch.isfinite(ours).all()


def test_use_clipped_model_output_is_diffusers_option_unguided():
    """Unguided, ``use_clipped_model_output=True`` is DDIMScheduler.step's option of that name,
    step for step; the default (None) is its default step."""
    unet = tiny_unet()
    config = dict(BASE, clip_sample=True)
    diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(DDIMScheduler(**config)))
    x_T = 3 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))  # off the data: its x0 is clipped
    grid = diffusion.schedule.grid(6, "ddim")
    for option in (True, None):
        ref = _reference_loop(unet, DDIMScheduler(**config), x_T, 6, None, 1, use_clipped_model_output=bool(option))
        ours = sample_ddim(diffusion, x_T, grid, use_clipped_model_output=option)
        assert (ours - ref).abs().max().item() < 1e-5, option
    plain = sample_ddim(diffusion, x_T, grid)
    assert (sample_ddim(diffusion, x_T, grid, use_clipped_model_output=True) - plain).abs().max() > 1e-3  # the option matters here


def test_ddpm_guidance_is_variance_times_gradient(tiny_diffusion):
    """Dhariwal & Nichol Algorithm 1: the guided mean is mu + Sigma * s * grad."""
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    y = torch.tensor([1, 2])
    x_t = torch.randn(2, 1, 8, 8)
    grid = tiny_diffusion.schedule.grid(10, "ddpm")
    guidance = NoisyInputGuidance(lambda x, _t: net(x), Classification(10), y, scale=3.0)
    seen = {}

    def first_step(key, **kw):
        sample_ddpm(
            tiny_diffusion, x_t, grid[:2], generator=torch.Generator().manual_seed(0), callback=lambda d: seen.setdefault(key, d), **kw
        )
        return seen[key]

    plain, guided = first_step("plain"), first_step("guided", guidance=guidance)
    a_t, a_prev = grid.abar[0], grid.abar_prev[0]
    var = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).float()
    assert guided["guidance"].abs().sum() > 0
    assert torch.allclose(guided["x"] - plain["x"], var * guided["guidance"], atol=1e-6)


def test_unsupported_scheduler_options_are_one_line_errors():
    from ppap import PPAPError

    with pytest.raises(PPAPError, match="thresholding"):
        NoiseSchedule.from_diffusers(DDPMScheduler(**BASE, thresholding=True))
    with pytest.raises(PPAPError, match="fixed_large_log"):
        NoiseSchedule.from_diffusers(DDPMScheduler(**BASE, variance_type="fixed_large_log"))
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(**BASE, variance_type="learned_range"))
    with pytest.raises(PPAPError, match="2x the image channels"):
        sample_ddpm(Diffusion(tiny_unet(), schedule), torch.randn(1, 1, 8, 8), schedule.grid(2, "ddpm"))
