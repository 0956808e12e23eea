"""Guidance methods beyond naive / ppap: x0-shortcut and its EluCD-style calibration, supervised
banks under their own names, and composed guidance over several tasks."""

import copy

import pytest
import torch
from torch import nn

from ppap import PPAPError
from ppap.banks import make_bank
from ppap.guidance import (
    CalibratedClassification,
    Calibration,
    GuidanceSpec,
    NoisyInputGuidance,
    NormalizedGuidance,
    ShortcutX0Guidance,
    SumGuidance,
    build_guidance,
)
from ppap.models import tiny_classifier, tiny_dense
from ppap.router import TimestepRouter
from ppap.tasks import Classification, DenseRegression, Segmentation
from ppap.train import TrainConfig


def test_shortcut_gradient_is_the_x0_gradient_over_sqrt_abar(tiny_diffusion):
    """No UNet backward: g = s * grad_{x0_hat} log p(y | x0_hat) / sqrt(abar_t), and a small step
    of x0_hat along it raises the target log-probability."""
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    task = Classification(10)
    x_t = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 60)
    pred = tiny_diffusion(x_t, t)
    y = torch.tensor([1, 2, 3, 4])
    g = ShortcutX0Guidance(net, task, y, 2.0, tiny_diffusion)(x_t, t, pred)
    x0 = pred.x0.clamp(-1, 1).requires_grad_(True)
    ll = task.log_likelihood(net(x0), y)
    g0 = torch.autograd.grad(ll.sum(), x0)[0]
    abar = tiny_diffusion.schedule.abar(t, x_t)
    assert torch.allclose(g, 2.0 * g0 / abar.sqrt(), atol=1e-6)
    with torch.no_grad():
        after = task.log_likelihood(net(pred.x0.clamp(-1, 1) + 1e-2 * g0 / g0.norm()), y)
    assert (after > ll.detach()).all()
    sigma = ShortcutX0Guidance(net, task, y, 2.0, tiny_diffusion, scale_schedule="sigma")(x_t, t, pred)
    assert torch.allclose(sigma, g * (1 - abar).sqrt(), atol=1e-6)


def test_x0_gradient_is_that_of_the_clipped_loss_through_the_unet(tiny_diffusion):
    """x0 guidance is the exact gradient w.r.t. x_t of log p(y | net(clip(x0_hat(x_t)))), saturated
    pixels included (a straight-through clip gives another vector), from the same single forward
    whose prediction the sampler uses."""
    from ppap.guidance import PredictedX0Guidance

    torch.manual_seed(0)
    net = tiny_classifier().eval()
    task = Classification(10)
    x_t = 3 * torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 90)  # high noise (of 100 steps): x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) saturates
    y = torch.tensor([1, 2, 3, 4])
    pred, g = PredictedX0Guidance(tiny_diffusion, net, task, y, 2.0).guided_prediction(x_t, t)
    x = x_t.clone().requires_grad_(True)
    x0 = tiny_diffusion(x, t).x0
    saturated = (x0.detach().abs() > 1).float().mean()
    assert 0.05 < saturated < 0.95  # the clip matters here
    want = torch.autograd.grad(2.0 * task.log_likelihood(net(x0.clamp(-1, 1)), y).sum(), x)[0]
    assert torch.allclose(g, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(pred.x0, x0.detach()) and not pred.x0.requires_grad


@pytest.mark.parametrize("max_batch", [1, 3])
def test_x0_in_sub_batches_gives_the_whole_batch_gradient(max_batch):
    """x0's UNet backward in sub-batches (to cap its memory) is exact: the same prediction and
    gradient as the whole batch, the per-sample conditions (class labels, CFG) sliced along."""
    from diffusers import DDPMScheduler

    from ppap import Conditioning, Diffusion, NoiseSchedule
    from ppap.guidance import PredictedX0Guidance

    from conftest import tiny_unet

    torch.manual_seed(0)
    diffusion = Diffusion(tiny_unet(num_class_embeds=4), NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100)))
    cond = Conditioning(class_labels=torch.tensor([0, 1, 2, 3, 1]), negative_class_labels=torch.full((5,), 3), guidance_scale=2.0)
    denoiser, net, task = diffusion.bind(cond), tiny_classifier().eval(), Classification(10)
    x_t, t, y = torch.randn(5, 1, 8, 8), torch.full((5,), 60), torch.tensor([1, 2, 3, 4, 5])
    whole_pred, whole = PredictedX0Guidance(denoiser, net, task, y, 2.0).guided_prediction(x_t, t)
    pred, g = PredictedX0Guidance(denoiser, net, task, y, 2.0, max_batch=max_batch).guided_prediction(x_t, t)
    assert torch.allclose(g, whole, atol=1e-6, rtol=1e-5) and torch.allclose(pred.x0, whole_pred.x0, atol=1e-6)
    with pytest.raises(PPAPError, match="max_batch must be an integer >= 1, got 0"):
        PredictedX0Guidance(denoiser, net, task, y, 2.0, max_batch=0)


def test_calibrated_log_likelihood_and_softplus():
    z, y = torch.randn(5, 10), torch.arange(5)
    plain = Calibration().calibrate_task(Classification(10))
    assert torch.allclose(plain.log_likelihood(z, y), z.log_softmax(-1)[torch.arange(5), y])
    cal = Calibration(target_temperature=0.5, norm_temperature=2.0).calibrate_task(Classification(10))
    assert isinstance(cal, CalibratedClassification)
    assert torch.allclose(cal.log_likelihood(z, y), z[torch.arange(5), y] / 0.5 - torch.logsumexp(z / 2.0, -1))
    torch.manual_seed(0)
    net = tiny_classifier().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    soft = Calibration(softplus_beta=3.0).calibrate_net(net)
    assert not any(isinstance(m, nn.ReLU) for m in soft.modules()) and any(isinstance(m, nn.ReLU) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(soft(x), net(x))
    with pytest.raises(PPAPError, match="no nn.ReLU modules"):
        Calibration(softplus_beta=1.0).calibrate_net(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(PPAPError, match="bad calibration option 'temperature=2'"):
        Calibration.parse("temperature=2")
    with pytest.raises(PPAPError, match="unknown scale schedule 'cosine'"):
        Calibration.parse("scale_schedule=cosine")
    assert Calibration.parse("norm_temperature=2,softplus_beta=3") == Calibration(norm_temperature=2.0, softplus_beta=3.0)


def test_supervised_banks_guide_under_their_own_names():
    """noise-aware and multi-expert-supervised route x_t through the bank's expert for t (not the
    frozen net), and a step along the gradient raises the routed expert's target log-probability."""
    torch.manual_seed(0)
    bank = make_bank(tiny_classifier(), TimestepRouter.uniform(2, 100), TrainConfig(adapter="full").adapter_config()).eval()
    with torch.no_grad():
        next(bank.experts["expert_1"].parameters()).mul_(-3.0)  # make the two experts differ
    y, x, t = torch.tensor([3, 4]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 90])
    spec = GuidanceSpec(task=Classification(10), target=y, scale=1.0, experts=bank)
    for method in ("noise-aware", "multi-expert-supervised"):
        g = build_guidance(method, spec)(x, t, None)
        xr = x.clone().requires_grad_(True)
        routed = torch.cat([bank.run_expert(0, xr[:1]), bank.run_expert(1, xr[1:])]).log_softmax(-1)[torch.arange(2), y]
        assert torch.allclose(g, torch.autograd.grad(routed.sum(), xr)[0], atol=1e-6)
        with torch.no_grad():
            before = bank(x, t).log_softmax(-1)[torch.arange(2), y]
            after = bank(x + 1e-2 * g, t).log_softmax(-1)[torch.arange(2), y]
        assert (after > before).all()


@pytest.mark.parametrize("layout", ["segmentation", "dense"])
def test_composed_guidance_raises_both_log_likelihoods(layout):
    """A class term plus a layout term (a label mask or a dense map): one small step along the
    summed gradient raises the log-likelihood of each term's own target."""
    torch.manual_seed(0)
    clf = tiny_classifier().eval()
    if layout == "segmentation":
        net, task, target = tiny_dense(3).eval(), Segmentation(3), torch.randint(0, 3, (3, 8, 8))
    else:
        net, task, target = tiny_dense(1).eval(), DenseRegression("l1"), torch.rand(3, 1, 8, 8)
    x = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 5, 9])
    terms = [
        NoisyInputGuidance(lambda v, s: clf(v), Classification(10), y, 1.0),
        NoisyInputGuidance(lambda v, s: net(v), task, target, 30.0),
    ]
    # equal-size terms: the sum then has a positive component along each term's own gradient
    g = SumGuidance([NormalizedGuidance(term, 1.0) for term in terms])(x, torch.full((3,), 10), None)
    step = x + 1e-3 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        for term, model in zip(terms, (clf, net)):
            assert (term.task.log_likelihood(model(step), term.target) > term.task.log_likelihood(model(x), term.target)).all()


def test_equal_log_snr_router(tiny_diffusion):
    abar = tiny_diffusion.schedule.alphas_cumprod
    router = TimestepRouter.parse("logsnr:4", 100, abar)
    b = router.boundaries
    assert b[0] == 0 and b[-1] == 100 and all(hi > lo for lo, hi in zip(b, b[1:]))
    log_snr = (abar / (1 - abar)).log()
    widths = [float(log_snr[lo] - log_snr[hi - 1]) for lo, hi in zip(b, b[1:])]
    total = float(log_snr[0] - log_snr[-1])
    assert all(abs(w - total / 4) < 0.1 * total for w in widths), widths
    assert b[1] - b[0] < b[-1] - b[-2]  # a linear schedule spends log-SNR fastest at low t
    with pytest.raises(PPAPError, match="need the diffusion model's noise schedule"):
        TimestepRouter.parse("logsnr:4", 100)


def test_guidance_interval_and_normalisation_of_a_term():
    """A term with ``interval`` guides only inside it (a batch mixing timesteps is masked per
    sample); ``normalize`` gives unit-RMS gradients times the scale; bad intervals are refused."""
    from ppap.guidance import GuidanceTerm

    torch.manual_seed(0)
    net = tiny_classifier().eval()
    y, x = torch.tensor([1, 2, 3]), torch.randn(3, 1, 8, 8)
    plain = GuidanceTerm("naive", Classification(10), y, 2.0, net=net).build()
    inside = GuidanceTerm("naive", Classification(10), y, 2.0, net=net, interval=(10, 50)).build()
    t = torch.tensor([5, 10, 49])
    g, want = inside(x, t, None), plain(x, t, None)
    assert (g[0] == 0).all() and torch.allclose(g[1:], want[1:]) and want[0].abs().sum() > 0
    assert (inside(x, torch.full((3,), 50), None) == 0).all()
    normed = GuidanceTerm("naive", Classification(10), y, 2.0, net=net, normalize=True).build()(x, t, None)
    assert torch.allclose(normed.flatten(1).square().mean(1).sqrt(), torch.full((3,), 2.0), atol=1e-5)
    unit = lambda v: v.flatten(1) / v.flatten(1).norm(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(unit(normed), unit(want), atol=1e-5)  # each sample's direction is its gradient's
    for bad in ((50, 10), (-1, 5), (3, 3)):
        with pytest.raises(PPAPError, match="guidance interval"):
            GuidanceTerm("naive", Classification(10), y, 2.0, net=net, interval=bad)


def test_a_terms_blend_guides_as_a_blending_bank_and_leaves_the_shared_bank_unchanged():
    """Soft routing as a field of the term: its gradient is the one a bank with ``blend`` set
    gives, and the bank other terms share is never changed, also when the call fails."""
    from ppap.guidance import GuidanceTerm

    torch.manual_seed(0)
    bank = make_bank(tiny_classifier(), TimestepRouter.uniform(3, 100), TrainConfig(rank=4, alpha=4).adapter_config())
    with torch.no_grad():  # experts that differ, so that blending them changes the gradient
        for i in range(3):
            for p in bank.trainable_parameters(i):
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    bank.eval()
    y, x = torch.tensor([1, 2, 3]), torch.randn(3, 1, 8, 8)
    t = torch.tensor([32, 35, 50])  # two near the boundary at 33, one far from it

    def seen(b):  # what every user of the bank sees: its routing width, mode and tensors
        return b.blend, b.training, {k: v.clone() for k, v in b.state_dict().items()}

    def same(a, b):
        return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])

    blending = copy.deepcopy(bank)
    blending.blend = 10  # the bank-wide setting the term's field stands for
    want = GuidanceTerm("ppap", Classification(10), y, 2.0, experts=blending).build()(x, t, None)
    before = seen(bank)
    g = GuidanceTerm("ppap", Classification(10), y, 2.0, experts=bank, blend=10).build()(x, t, None)
    plain = GuidanceTerm("ppap", Classification(10), y, 2.0, experts=bank).build()(x, t, None)
    assert torch.allclose(g, want, atol=1e-6)
    assert torch.allclose(g[2], plain[2], atol=1e-6) and not torch.allclose(g[:2], plain[:2], atol=1e-4)  # far from a boundary: one expert
    assert same(seen(bank), before)
    with pytest.raises(RuntimeError):  # 3 channels into a 1-channel net: fails inside the blended call
        GuidanceTerm("ppap", Classification(10), y, 2.0, experts=bank, blend=10).build()(x.repeat(1, 3, 1, 1), t, None)
    assert same(seen(bank), before)
    for bad in (-1, 2.5):
        with pytest.raises(PPAPError, match="guidance blend must be an integer"):
            GuidanceTerm("ppap", Classification(10), y, 2.0, experts=bank, blend=bad)
    with pytest.raises(PPAPError, match="method 'naive' has none"):
        GuidanceTerm("naive", Classification(10), y, 2.0, net=tiny_classifier(), blend=10)


def test_ppap_guidance_runs_a_bank_in_train_mode_in_eval_mode_and_leaves_its_mode():
    """``build_guidance`` and the guidance it builds run the caller's bank in eval mode for each
    call only: a bank the caller is training keeps every module's mode."""
    torch.manual_seed(0)
    bank = make_bank(tiny_classifier(), TimestepRouter.uniform(2, 100), TrainConfig(rank=4, alpha=4).adapter_config())
    assert any(isinstance(m, nn.BatchNorm2d) for m in bank.modules())  # train mode would change the output
    bank.train()
    modes = [m.training for m in bank.modules()]
    y, x, t = torch.tensor([1, 2]), torch.randn(2, 1, 8, 8), torch.tensor([10, 90])
    g = build_guidance("ppap", GuidanceSpec(task=Classification(10), target=y, scale=1.0, experts=bank))(x, t, None)
    assert [m.training for m in bank.modules()] == modes
    in_eval = copy.deepcopy(bank).eval()
    want = build_guidance("ppap", GuidanceSpec(task=Classification(10), target=y, scale=1.0, experts=in_eval))(x, t, None)
    assert torch.allclose(g, want, atol=1e-6)
    assert all(p.grad is None for p in bank.parameters())  # no gradient reached the weights
