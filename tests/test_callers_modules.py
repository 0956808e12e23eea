"""ppap never changes the caller's modules: a UNet or a guide it is given keeps its training
flags and requires_grad through construction, sampling and guidance, and is run in eval mode
with no weight gradient for each call only."""

import copy

import torch
from diffusers import DDPMScheduler
from torch import nn

from ppap import Classification, Diffusion, GuideModel, NoiseSchedule, NoisyInputGuidance, PPAPPipeline
from ppap.models import tiny_classifier

from conftest import tiny_unet


def _flags(module: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in module.modules()], [p.requires_grad for p in module.parameters()]


def _mixed_flags(module: nn.Module) -> nn.Module:
    """A module as a training loop leaves it: train mode, one child in eval, one weight frozen."""
    module.train()
    children = list(module.children())
    children[0].eval()
    next(children[-1].parameters()).requires_grad_(False)
    return module


def _seen_inside(module: nn.Module) -> list[tuple[bool, bool]]:
    """(training, whether a weight gradient could be recorded) of ``module`` at each of its forward calls."""
    seen: list[tuple[bool, bool]] = []
    module.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, torch.is_grad_enabled() and any(p.requires_grad for p in m.parameters())))
    )
    return seen


def test_diffusion_and_sampling_leave_the_callers_unet_as_it_was():
    unet = _mixed_flags(tiny_unet(num_class_embeds=None))
    before, weights = _flags(unet), copy.deepcopy(unet.state_dict())
    seen = _seen_inside(unet)
    Diffusion(unet, NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100)))
    assert _flags(unet) == before
    pipe = PPAPPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    common = dict(batch_size=2, num_inference_steps=3, output_type="latent", progress=False)
    plain = pipe(generator=torch.Generator().manual_seed(0), **common).images
    assert _flags(unet) == before
    guided = pipe(
        generator=torch.Generator().manual_seed(0), guide=tiny_classifier(), target=3, method="x0", classifier_scale=5.0, **common
    )
    assert not torch.equal(plain, guided.images)  # the gradient went through the UNet, to x only
    assert _flags(unet) == before and all(p.grad is None for p in unet.parameters())
    assert seen and set(seen) == {(False, False)}  # eval mode, no weight gradient, during each call
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())


def test_a_dropout_unet_in_train_mode_samples_as_in_eval_mode():
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([50, 50])
    unet = tiny_unet()
    for m in unet.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    assert any(isinstance(m, nn.Dropout) for m in unet.modules())
    reference = Diffusion(copy.deepcopy(unet).eval(), schedule)(x, t).eps
    d = Diffusion(unet.train(), schedule)
    assert torch.equal(d(x, t).eps, reference) and torch.equal(d(x, t).eps, reference)
    assert unet.training


def test_guide_model_and_guidance_leave_the_callers_net_as_it_was():
    torch.manual_seed(0)
    net = _mixed_flags(tiny_classifier())
    before, stats = _flags(net), {k: v.clone() for k, v in net.state_dict().items()}
    seen = _seen_inside(net)
    guide = GuideModel(net)
    assert _flags(net) == before
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    g = NoisyInputGuidance(lambda v, t: guide(v), Classification(10), torch.tensor([1, 2, 3]), 1.0)(x, torch.tensor([5, 5, 5]), None)
    assert g.abs().sum() > 0 and _flags(net) == before and all(p.grad is None for p in net.parameters())
    assert set(seen) == {(False, False)}
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())  # BatchNorm statistics did not move
    with torch.no_grad():
        assert torch.equal(guide(x), copy.deepcopy(net).eval()(x))  # eval-mode outputs


def test_calling_a_lora_bank_leaves_its_parameters_flags_as_they_were():
    """peft's ``set_adapter`` makes the selected adapter trainable and the others frozen: a bank
    call that routes to another expert must not change which of the caller's parameters are."""
    from ppap import AdapterConfig, TimestepRouter
    from ppap.banks import make_bank

    bank = make_bank(tiny_classifier(), TimestepRouter.uniform(3, 300), AdapterConfig(rank=2, alpha=2))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    for setting in ("frozen", "mixed"):
        bank.requires_grad_(False)
        if setting == "mixed":  # a training loop's choice: expert 2's LoRA trainable, the rest frozen
            for p in bank.trainable_parameters(2):
                p.requires_grad_(True)
        before = _flags(bank)[1]
        for t in (0, 150, 250, 50):  # experts 0, 1, 2, 0: every switch of the active adapter
            bank.eval()(x, torch.full((2,), t))
            assert _flags(bank)[1] == before, (setting, t)
