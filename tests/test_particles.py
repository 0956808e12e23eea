"""Particle methods (best-of-n, FK, TDS, ppap-smc, ppap-fk): the SMC machinery, one step's weight against
the Gaussian densities, the reduction to the proposal at K = 1, no UNet backward for ppap-smc,
exactness on an analytic Gaussian-mixture diffusion, and the pipeline / CLI surface."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ppap import Diffusion, LoRAExperts, NoiseSchedule, PPAPError, PPAPPipeline, TimestepRouter
from ppap.diffusion import Prediction
from ppap.guidance import NoisyInputGuidance, PredictedX0Guidance
from ppap.models import tiny_classifier
from ppap.particles import CleanReward, ExpertTwist, X0Twist, particle_noise, sample_particles, smc_step, start
from ppap.samplers import sample_ddim, sample_ddpm
from ppap.smc import effective_sample_size, systematic_resample
from ppap.tasks import Classification

from conftest import tiny_unet


def test_systematic_resampling_counts_are_floor_or_ceil_and_seeded():
    log_w = torch.randn(6, 7, generator=torch.Generator().manual_seed(0)) * 2
    log_w[0, 3] = float("-inf")  # an impossible particle is never drawn
    w = log_w.softmax(-1).double()
    idx = systematic_resample(log_w, torch.Generator().manual_seed(1))
    counts = torch.stack([torch.bincount(row, minlength=7) for row in idx])
    assert ((counts == (7 * w).floor()) | (counts == (7 * w).ceil())).all() and counts[0, 3] == 0
    again = systematic_resample(log_w, torch.Generator().manual_seed(1))
    per_image = systematic_resample(log_w, [torch.Generator().manual_seed(s) for s in range(6)])
    assert torch.equal(idx, again) and per_image.shape == (6, 7)


def test_effective_sample_size():
    k = 8
    one_hot = torch.full((1, k), float("-inf"))
    one_hot[0, 2] = 0.0
    assert torch.allclose(effective_sample_size(torch.zeros(3, k)), torch.full((3,), float(k), dtype=torch.float64))
    assert float(effective_sample_size(one_hot)) == 1.0
    assert 1 < float(effective_sample_size(torch.tensor([[0.0, -1.0, -2.0]]))) < 3


def _tiny():
    torch.manual_seed(0)
    diffusion = Diffusion(tiny_unet(), NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100)))
    torch.manual_seed(1)
    return diffusion, tiny_classifier().eval()


def test_one_tds_step_weight_is_the_gaussian_density_ratio_and_the_twists():
    """Step 0 of a 3-step DDPM grid and the last step, recomputed by hand: the posterior mean and
    variance (Ho et al. eq. 7), the proposal shifted by sigma^2 grad, log N(x'; mu, s^2) - log
    N(x'; mu + s^2 g, s^2) from torch.distributions, and the twists before and after."""
    diffusion, net = _tiny()
    task, lam = Classification(10), 2.0
    target = torch.tensor([3, 3, 5])
    grid = diffusion.schedule.grid(3, "ddpm")
    twist = X0Twist(diffusion, CleanReward(net, task, target, lam), gradient=True)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    state = start(twist, x, int(grid.timesteps[0]))
    new, increment = smc_step(diffusion, grid, 0, state, twist, twist.reward, generator=torch.Generator().manual_seed(5))

    def by_hand_twist(x_t, t):
        x_t = x_t.detach().requires_grad_(True)
        x0 = diffusion(x_t, torch.full((3,), t)).x0
        value = lam * net(x0.clamp(-1, 1)).log_softmax(-1)[torch.arange(3), target]
        return value.detach().double(), torch.autograd.grad(value.sum(), x_t)[0]

    value, grad = by_hand_twist(x, int(grid.timesteps[0]))
    a_t, a_prev = grid.abar[0], grid.abar_prev[0]
    with torch.no_grad():
        x0 = diffusion(x, torch.full((3,), int(grid.timesteps[0]))).x0.clamp(-1, 1).double()
    beta = 1 - a_t / a_prev
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t) * x.double()
    var = (1 - a_prev) / (1 - a_t) * beta
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    x_new = mean + var * grad.double() + var.sqrt() * noise
    assert torch.allclose(new.x.double(), x_new, atol=1e-5)
    normal = torch.distributions.Normal
    log_p = normal(mean, var.sqrt()).log_prob(x_new).flatten(1).sum(-1)
    log_q = normal(mean + var * grad.double(), var.sqrt()).log_prob(x_new).flatten(1).sum(-1)
    value_next, _ = by_hand_twist(new.x, int(grid.timesteps[1]))
    assert torch.allclose(increment, log_p - log_q + value_next - value, atol=1e-3)
    assert (log_p - log_q).abs().max() > 1e-2  # the density ratio is part of what was checked
    # the last step has no noise (p and q are the same map): the final weight is p(y|x_0)^lam / p~_1(y|x_1)
    state = start(twist, new.x, int(grid.timesteps[2]))
    last, increment = smc_step(diffusion, grid, 2, state, twist, twist.reward)
    final = lam * net(last.x.clamp(-1, 1)).log_softmax(-1)[torch.arange(3), target].double()
    assert torch.allclose(increment, final - state.log_twist, atol=1e-4)


def test_ppap_fk_weights_are_the_experts_potential_differences_and_need_no_backward():
    """ppap-fk's step: the base step itself (no shift), and the incremental log-weight lambda (log
    expert_{t-1}(y | x_{t-1}) - log expert_t(y | x_t)), by the expert owning each t, with no
    autograd anywhere; the last step's weight is the clean classifier on x_0 over the last expert."""
    diffusion, net = _tiny()
    bank = _bank(tiny_classifier().eval())
    task, lam, target = Classification(10), 2.0, torch.tensor([3, 3, 5])
    grid = diffusion.schedule.grid(3, "ddpm")
    twist = ExpertTwist(diffusion, bank, task, target, lam, gradient=False)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    state = start(twist, x, int(grid.timesteps[0]))
    assert state.grad is None
    base = start(X0Twist(diffusion, CleanReward(net, task, target, lam)), x, int(grid.timesteps[0]))  # fk's: the same base step
    reward = CleanReward(net, task, target, lam)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("autograd saved a tensor"), lambda t: t):
        new, increment = smc_step(diffusion, grid, 0, state, twist, reward, generator=torch.Generator().manual_seed(5))
    fk_new, _ = smc_step(diffusion, grid, 0, base, X0Twist(diffusion, reward), reward, generator=torch.Generator().manual_seed(5))
    assert torch.equal(new.x, fk_new.x)

    def by_hand(x_t, t):
        with torch.no_grad():
            return lam * bank(x_t, torch.full((3,), t)).log_softmax(-1)[torch.arange(3), target].double()

    t0, t1 = int(grid.timesteps[0]), int(grid.timesteps[1])
    assert bank.router(torch.tensor([t0])) != bank.router(torch.tensor([t1]))  # a router boundary between the two: both experts count
    assert torch.allclose(increment, by_hand(new.x, t1) - by_hand(x, t0), atol=1e-5)
    last_state = start(twist, new.x, int(grid.timesteps[2]))
    last, increment = smc_step(diffusion, grid, 2, last_state, twist, reward)
    final = lam * net(last.x.clamp(-1, 1)).log_softmax(-1)[torch.arange(3), target].double()
    assert torch.allclose(increment, final - by_hand(new.x, int(grid.timesteps[2])), atol=1e-4)


def _bank(net):
    torch.manual_seed(2)
    bank = LoRAExperts(net, TimestepRouter.uniform(2, 100)).eval()
    bank.task = Classification(10)
    return bank


@pytest.mark.parametrize("method", ["best-of-n", "fk", "tds", "ppap-smc", "ppap-fk"])
def test_one_particle_is_the_proposal(method):
    """K = 1: no resampling, no choice; each method is its proposal's sampler, noise for noise:
    the base chain (best-of-n, fk, ppap-fk), x0 guidance through the UNet (tds), PPAP's guidance
    at the annealed scale 1 + (lambda - 1) abar_t (ppap-smc)."""
    diffusion, net = _tiny()
    bank = _bank(tiny_classifier().eval())
    task, target, lam = Classification(10), torch.tensor([1, 7]), 3.0
    grid = diffusion.schedule.grid(3, "ddpm")
    x = particle_noise(2, 1, (1, 8, 8), [torch.Generator().manual_seed(s) for s in (0, 1)], "cpu")

    def annealed_ppap(x_t, t, pred):
        gamma = 1 + (lam - 1) * diffusion.schedule.alphas_cumprod[t].float()
        return gamma.view(-1, 1, 1, 1) * NoisyInputGuidance(bank, task, target, 1.0)(x_t, t, pred)

    guidance = {"tds": PredictedX0Guidance(diffusion, net, task, target, lam), "ppap-smc": annealed_ppap}.get(method)
    want = sample_ddpm(diffusion, x, grid, guidance=guidance, generator=[torch.Generator().manual_seed(s) for s in (10, 11)])
    got = sample_particles(
        method,
        diffusion,
        x,
        grid,
        particles=1,
        net=net,
        task=task,
        target=target,
        scale=lam,
        bank=bank,
        generator=[torch.Generator().manual_seed(s) for s in (10, 11)],
    )
    assert torch.allclose(got.images, want, atol=1e-5) and not got.resampled.any()
    assert torch.equal(got.ess, torch.ones_like(got.ess))


def test_ddim_with_eta_is_the_ddim_chain():
    diffusion, net = _tiny()
    grid = diffusion.schedule.grid(3, "ddim")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    want = sample_ddim(diffusion, x, grid, eta=1.0, generator=torch.Generator().manual_seed(3))
    got = sample_particles(
        "best-of-n", diffusion, x, grid, particles=1, net=net, task=Classification(10), target=torch.tensor([0, 1]),
        scale=1.0, kind="ddim", eta=1.0, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert torch.allclose(got.images, want, atol=1e-5)
    with pytest.raises(PPAPError, match="ddpm, or ddim with eta > 0"):
        sample_particles(
            "fk",
            diffusion,
            x,
            grid,
            particles=1,
            net=net,
            task=Classification(10),
            target=torch.tensor([0, 1]),
            scale=1.0,
            kind="ddim",
            eta=0.0,
        )


def test_ppap_smc_makes_no_unet_backward_and_tds_does():
    diffusion, net = _tiny()
    bank = _bank(tiny_classifier().eval())
    grads = []
    hook = diffusion.unet.register_forward_hook(lambda m, args, out: grads.append(torch.is_grad_enabled() and args[0].requires_grad))
    grid = diffusion.schedule.grid(2, "ddpm")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(particles=2, net=net, task=Classification(10), target=torch.tensor([1, 2]), scale=1.0, bank=bank)
    out = sample_particles("ppap-smc", diffusion, x, grid, **common)
    smc_calls, grads[:] = list(grads), []
    sample_particles("tds", diffusion, x, grid, **common)
    hook.remove()
    assert len(smc_calls) == 2 and not any(smc_calls) and all(grads)
    assert out.images.shape == (2, 1, 8, 8) and out.particles.shape == (4, 1, 8, 8) and out.log_weights.shape == (2, 2)


# ---- exactness on a diffusion whose denoiser and classifier are analytic ------------------------

MEANS, STD, SLOPE = (-0.5, 0.5), 0.15, 4.0  # p(x) = N(-0.5, 0.15^2) / 2 + N(0.5, 0.15^2) / 2, p(y=1 | x) = sigmoid(4 x)


@dataclass
class Mixture:
    """The exact eps of the 1-D two-Gaussian mixture under the VP forward process."""

    schedule: NoiseSchedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        a = self.schedule.abar(t, x)
        var = a * STD**2 + 1 - a
        d = x[..., None] - a[..., None].sqrt() * torch.tensor(MEANS)
        score = (torch.softmax(-d.square() / (2 * var[..., None]), -1) * -d).sum(-1) / var
        eps = -(1 - a).sqrt() * score
        return Prediction(eps, (x - (1 - a).sqrt() * eps) / a.sqrt())


def _logits(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(x.shape[0], 1), SLOPE * x.flatten(1)], 1)


def _conditional() -> tuple[float, float]:
    """P(x > 0 | y = 1) and E[x | y = 1] by quadrature (x clipped to [-1, 1] for the classifier, as ppap does)."""
    x = torch.linspace(-2, 2, 40001, dtype=torch.float64)
    w = sum(torch.exp(-((x - m) ** 2) / (2 * STD**2)) for m in MEANS) * torch.sigmoid(SLOPE * x.clamp(-1, 1))
    w = w / w.sum()
    return float((w * (x > 0)).sum()), float((w * x).sum())


def test_the_expert_twists_exponent_is_annealed_from_one_to_lambda():
    """ppap-smc's twist: gamma_t log expert_t(y | x_t), gamma_t = 1 + (lambda - 1) abar_t, lambda
    on clean images and 1 at pure noise; without ``alphas_cumprod`` (ppap-fk) gamma_t = lambda."""
    diffusion, _ = _tiny()
    bank = _bank(tiny_classifier().eval())
    task, target, lam = Classification(10), torch.tensor([1, 7, 7]), 5.0
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 50, 99])
    abar = diffusion.schedule.alphas_cumprod
    plain = ExpertTwist(diffusion, bank, task, target, 1.0)(x, t)[1]
    annealed = ExpertTwist(diffusion, bank, task, target, lam, alphas_cumprod=abar)
    gamma = annealed.exponent(t)
    assert torch.allclose(gamma.double(), 1 + (lam - 1) * abar[t]) and gamma[0] > 4.99 and 1 < gamma[2] < gamma[1] < gamma[0]
    _, log_twist, grad = annealed(x, t)
    assert torch.allclose(log_twist, gamma * plain)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        want = torch.autograd.grad((gamma * task.log_likelihood(bank(xg, t), target)).sum(), xg)[0]
    assert torch.allclose(grad, want, atol=1e-6)
    assert torch.equal(ExpertTwist(diffusion, bank, task, target, lam).exponent(t), torch.full((3,), lam))


def test_twisted_smc_samples_the_exact_conditional_where_gradient_guidance_does_not():
    """p(x | y) of a Gaussian mixture, with an exact denoiser: TDS and ppap-smc (its twist a
    deliberately wrong noisy classifier, the final weight by the clean one) return samples with
    the conditional's class proportion and mean; gradient guidance by the noisy classifier does not."""
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000, clip_sample=False))
    denoiser, grid, task = Mixture(schedule), schedule.grid(50, "ddpm"), Classification(2)
    num, k = 1000, 16
    target = torch.ones(num, dtype=torch.long)
    positive, mean = _conditional()

    def close(x: torch.Tensor) -> bool:
        return abs(float((x > 0).float().mean()) - positive) < 0.035 and abs(float(x.mean()) - mean) < 0.05

    noisy_classifier = lambda x, t: _logits(x) / 4  # noqa: E731  # p~_t(y | x_t) = sigmoid(x_t): not p_t(y | x_t)
    for method in ("tds", "ppap-smc"):
        g = torch.Generator().manual_seed(1)
        x = particle_noise(num, k, (1, 1, 1), g, "cpu")
        run = sample_particles(
            method, denoiser, x, grid, particles=k, net=_logits, task=task, target=target, scale=1.0, bank=noisy_classifier, generator=g
        )
        assert close(run.images), (method, float((run.images > 0).float().mean()), float(run.images.mean()), positive, mean)
        assert abs(float(run.log_evidence.exp().mean()) - 0.5) < 0.03  # p(y = 1) = 1/2 by symmetry
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num, 1, 1, 1, generator=g)
    for guidance in (
        NoisyInputGuidance(lambda x, t: _logits(x), task, target, 1.0),
        NoisyInputGuidance(noisy_classifier, task, target, 1.0),
    ):
        assert not close(sample_ddpm(denoiser, x, grid, guidance=guidance, generator=g))


# ---- pipeline and command line ------------------------------------------------------------------


def _pipe():
    torch.manual_seed(0)
    return PPAPPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))


def test_pipeline_particle_methods_and_their_errors():
    pipe, (_, net) = _pipe(), _tiny()
    bank = _bank(tiny_classifier().eval()).train()  # the caller's bank in train mode: sampled in eval mode, handed back as it came
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    out = pipe(
        batch_size=2,
        num_inference_steps=2,
        guide=net,
        experts=bank,
        method="ppap-smc",
        particles=2,
        target=[1, 2],
        output_type="pt",
        progress=False,
    )
    assert bank.training and all(torch.equal(before[k], v) for k, v in bank.state_dict().items())  # no norm statistics moved
    assert out.images.shape == (2, 1, 8, 8) and out.diagnostics.ess.shape == (2, 2) and out.diagnostics.particles.shape == (4, 1, 8, 8)
    fk = pipe(
        batch_size=2, num_inference_steps=2, experts=bank, method="ppap-fk", particles=3, target=[1, 2], output_type="pt", progress=False
    )
    assert fk.images.shape == (2, 1, 8, 8) and fk.diagnostics.particles.shape == (6, 1, 8, 8)  # the bank's own guide as the final reward
    reward = CleanReward(bank.teacher, Classification(10), torch.tensor([1, 2]).repeat_interleave(3), 1.0)
    best = reward(fk.diagnostics.particles).view(2, 3).argmax(-1)  # the particles as sampled, in [-1, 1]
    assert torch.equal(fk.diagnostics.chosen, best)  # ppap-fk returns the particle the clean classifier scores best
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    a = pipe(batch_size=2, num_inference_steps=2, guide=net, method="fk", particles=3, generator=gens, output_type="latent", progress=False)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    b = pipe(batch_size=2, num_inference_steps=2, guide=net, method="fk", particles=3, generator=gens, output_type="latent", progress=False)
    assert torch.equal(a.images, b.images)  # seeded: resampling and the pick included
    from ppap import GuideModel
    from ppap.models import tiny_dense

    cases = [
        (dict(method="tds"), "method 'tds' needs particles >= 1"),
        (dict(method="tds", particles=0), "needs particles >= 1 (--particles K), got 0"),
        (dict(method="ppap", experts=bank, particles=2), "particles= is for one term of a particle method"),
        (dict(method="ppap-smc", particles=2), "method 'ppap-smc' needs --experts"),
        (dict(method="fk", particles=2, sampler="ddim"), "not ddim with eta 0"),
        (dict(method="fk", particles=2, sampler="dpm++"), "not DPMSolverMultistepScheduler"),
        (
            dict(method="tds", particles=2, guide=GuideModel(tiny_dense(1), task="dense")),
            "takes a classifier guide (classification), not dense",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(PPAPError) as e:
            pipe(**({"batch_size": 1, "num_inference_steps": 2, "guide": net, "progress": False} | kwargs))
        assert message in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))


def test_cli_particles(tiny_models, tmp_path, capsys):
    from ppap.cli import main

    m = tiny_models
    grid = tmp_path / "grid.png"
    base = ["--threads", "1", "sample", "--diffusion", m["diffusion"], "--guide", m["guide"], "--guide-weights", m["weights"]]
    base += ["--num", "3", "--steps", "2", "--batch-size", "2", "--target", "3", "--out", str(grid), "--quiet"]
    assert main(base + ["--method", "tds", "--particles", "2", "--sampler", "ddpm", "--scale", "2"]) == 0
    data = np.load(grid.with_suffix(".npz"))
    assert data["images"].shape == (3, 8, 8, 1) and data["targets"].tolist() == [3, 3, 3]
    for extra, message in (
        (["--method", "fk"], "--method fk needs --particles K with K >= 1, got None"),
        (["--method", "fk", "--particles", "0"], "K >= 1, got 0"),
        (["--method", "naive", "--particles", "2"], "--particles is for the particle methods"),
        (["--method", "best-of-n", "--particles", "2"], "not ddim with eta 0 (--sampler ddpm, or --eta 1)"),
        (["--method", "ppap-fk", "--particles", "2", "--sampler", "ddpm"], "method 'ppap-fk' needs --experts"),
    ):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ppap: error:") and message in err and "\n" not in err, err
