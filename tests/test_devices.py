"""Devices no GPU here can run, checked on the CPU: no float64 tensor is moved to a device (MPS
has none), CPU offload through accelerate's hooks as diffusers' own tests exercise it, and a
bfloat16 UNet under float32 guidance."""

import accelerate
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ppap import Classification, LoRAExperts, PPAPPipeline, TimestepRouter
from ppap.models import tiny_classifier

from conftest import TEST_DEVICE, tiny_unet


def _bank():
    torch.manual_seed(0)
    bank = LoRAExperts(tiny_classifier(), TimestepRouter.uniform(2, 100)).eval()
    bank.task = Classification(10)
    return bank


def _names_a_device(args, kwargs) -> bool:
    values = list(args[1:]) + list(kwargs.values())
    return any(isinstance(v, (torch.device, str, Tensor)) for v in values) or "device" in kwargs


class NoFloat64Moves(TorchFunctionMode):
    """Records every ``Tensor.to`` / ``.cuda`` of a float64 tensor that names a device:
    code that casts before it moves never makes one (MPS cannot hold float64)."""

    def __init__(self):
        super().__init__()
        self.moves: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (Tensor.to, Tensor.cuda) and args and isinstance(args[0], Tensor) and args[0].dtype == torch.float64:
            if func is not Tensor.to or _names_a_device(args, kwargs):
                self.moves.append(f"{func.__name__}{tuple(str(a) for a in args[1:])} {kwargs}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("method, scheduler", [("ppap", DDPMScheduler), ("x0", DDIMScheduler), ("x0-shortcut", DDPMScheduler)])
def test_no_float64_tensor_is_moved_to_a_device(method, scheduler):
    pipe = PPAPPipeline(unet=tiny_unet(), scheduler=scheduler(num_train_timesteps=100))
    bank = _bank()
    guide = {"guide": bank.guide, "experts": bank} if method == "ppap" else {"guide": tiny_classifier().eval()}
    spy = NoFloat64Moves()
    with spy:
        latents = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # a caller's float64 x_T
        out = pipe(latents=latents, num_inference_steps=3, method=method, target=1, eta=0.5, output_type="latent", progress=False, **guide)
    assert torch.isfinite(out.images).all()
    assert spy.moves == []


def _ppap_images(pipe, bank):
    return pipe(
        batch_size=2,
        num_inference_steps=3,
        guide=bank.guide,
        experts=bank,
        target=[1, 2],
        classifier_scale=20.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        progress=False,
    ).images


class RestOnMeta(accelerate.hooks.ModelHook):
    """A hook in the manner of sequential offload, for a CPU: the module's weights rest on the
    meta device and are loaded from a CPU copy for each forward, on execution device "cpu".
    (accelerate's own ``cpu_offload`` fails on a CPU execution device with this torch, for
    diffusers' DDPMPipeline too.)"""

    execution_device = torch.device("cpu")

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.state = {k: v.clone() for k, v in module.state_dict().items()}
        module.to("meta")
        accelerate.hooks.add_hook_to_module(module, self)

    def pre_forward(self, module, *args, **kwargs):
        module.load_state_dict(self.state, assign=True)
        return args, kwargs

    def post_forward(self, module, output):
        module.to("meta")
        return output


@pytest.mark.parametrize("offload", ["model", "weights on meta"])
def test_cpu_offload_gives_the_same_images(offload):
    """diffusers' test_model_cpu_offload_forward_pass idea with accelerate's hooks on the CPU:
    the offloaded pipeline samples on its execution device (not where the weights rest) and gives
    the plain one's images; model offload keeps its hooks after the call (maybe_free_model_hooks)."""
    device = TEST_DEVICE if offload == "model" else torch.device("cpu")  # the meta-weights hook loads to the CPU
    bank = _bank().to(device)
    plain = _ppap_images(PPAPPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100)).to(device), bank)
    pipe = PPAPPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))
    if offload == "model":
        pipe.enable_model_cpu_offload(device=TEST_DEVICE)
    else:
        RestOnMeta(pipe.unet)
        assert next(pipe.unet.parameters()).device.type == "meta"
    assert pipe._execution_device.type == device.type
    offloaded = _ppap_images(pipe, bank)
    assert abs(offloaded - plain).max() < 1e-5
    if offload == "model":
        assert isinstance(getattr(pipe.unet, "_hf_hook", None), accelerate.hooks.CpuOffload)
        assert next(pipe.unet.parameters()).device.type == "cpu" and pipe._all_hooks
    again = _ppap_images(pipe, bank)  # diffusers' test_cpu_offload_forward_pass_twice
    assert abs(again - offloaded).max() < 1e-6


def test_bfloat16_unet_with_ppap_guidance_keeps_the_sampler_state_float32():
    pipe = PPAPPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).to(TEST_DEVICE)
    pipe.unet.to(torch.bfloat16)
    dtypes = set()

    def record(p, i, t, kwargs):
        dtypes.update((k, v.dtype) for k, v in kwargs.items())

    out = pipe(
        batch_size=2,
        num_inference_steps=4,
        experts=_bank().to(TEST_DEVICE),
        target=3,
        output_type="latent",
        progress=False,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "x0", "guidance"],
    ).images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert dtypes == {("latents", torch.float32), ("x0", torch.float32), ("guidance", torch.float32)}
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
