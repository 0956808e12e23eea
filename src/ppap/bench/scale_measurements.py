"""The measurements of ``ppap bench scale``: each a function of plain arguments (model folders,
device, dtype, sizes) that loads what it needs itself, as a user would, so that the bench can run
it in a fresh process (``common.in_fresh_process``) and a process's peak memory is its own.

* ``measure_times``: one mid-noise DDIM step per method, and its parts, timed round-robin;
* ``measure_memory`` / ``measure_x0_memory``: the peak memory of two steps of one method;
* ``build_bank``: a default-recipe bank saved as ``ppap train`` saves one, and its size on disk;
* ``measure_train_step``: one expert's training steps (time, peak memory);
* ``measure_throughput``: ppap's corpus sampling against diffusers' ``DDIMPipeline``.
"""

from __future__ import annotations

import copy
import gc
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .common import PeakMemory, mid_step, round_robin_median

METHODS = ("unguided", "naive", "ppap", "x0")
PROMPT_SHAPE = (77, 4096)  # T5-XXL-like prompt embeddings for the text-conditional UNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# one pair loaded as a user would load it
# --------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    pipe: Any
    denoiser: Any  # the diffusion model with its condition bound (class labels, prompt embeddings)
    guide: Any
    bank: Any
    device: torch.device
    batch: int

    def term(self, method: str):
        """``method``'s guidance term toward class 0 (a classifier) or toward the clean guide's
        output on a random reference image (segmentation, depth)."""
        if method == "unguided":
            return None
        shape = self.pipe.image_shape
        dense = self.guide.task in ("segmentation", "dense")
        image = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1 if dense else None
        return self.pipe.guidance_term(
            self.batch,
            guide=self.guide,
            experts=self.bank if method == "ppap" else None,
            target=None if dense else 0,
            target_image=image,
            method=method,
            classifier_scale=1.0,
        )

    def guidance(self, method: str):
        term = self.term(method)
        return None if term is None else term.build(self.denoiser)

    def noise(self):
        shape = (self.batch,) + self.pipe.image_shape
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(self.device)


def _load(
    diffusion_dir: str, guide_dir: str | None, bank_dir: str | None, device: str, dtype: str, batch: int, guide_copy: bool = True
) -> _Loaded:
    """The pipeline and (when given) the guide and its bank, on ``device`` in ``dtype``. The bank
    sits on a copy of the guide when ``guide_copy`` (so naive and PPAP can run side by side)."""
    from ..diffusion import Conditioning
    from ..loading import load_experts, load_guide, load_pipeline, resolve_device, resolve_dtype

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    pipe = load_pipeline(diffusion_dir, device=dev, dtype=dt)
    diffusion = pipe.diffusion
    config = pipe.unet.config
    labels = torch.zeros(batch, dtype=torch.long, device=dev) if getattr(config, "num_class_embeds", None) else None
    embeds = torch.randn((batch,) + PROMPT_SHAPE, generator=torch.Generator().manual_seed(2)).to(dev) if diffusion.takes_prompt else None
    cond = None if labels is None and embeds is None else Conditioning(labels, embeds)
    guide = bank = None
    if guide_dir is not None:
        guide = load_guide(guide_dir)
        if bank_dir is not None:  # loaded in float32: the experts check the backbone's weights as saved
            bank = load_experts(bank_dir, copy.deepcopy(guide) if guide_copy else guide, diffusion).to(dev).to(dt)
        guide = guide.to(dev).to(dt)
    return _Loaded(pipe, diffusion.bind(cond), guide, bank, dev, batch)


def _mid_step_call(loaded: _Loaded, steps: int, guidance) -> Callable[[], object]:
    from ..samplers import sample_ddim

    x, step = loaded.noise(), mid_step(loaded.pipe.diffusion, steps)
    return lambda: (sample_ddim(loaded.denoiser, x, step, guidance=guidance), _sync(loaded.device))


# --------------------------------------------------------------------------------------------
# the measurements (each run in a fresh process)
# --------------------------------------------------------------------------------------------


def measure_times(diffusion_dir: str, guide_dir: str, bank_dir: str, device: str, dtype: str, batch: int, steps: int, repeats: int) -> dict:
    """Median seconds of one mid-noise step per method and of its parts, timed round-robin. A
    call that runs out of memory (x0 at a large batch, say) is None, and the others are still timed."""
    loaded = _load(diffusion_dir, guide_dir, bank_dir, device, dtype, batch)
    calls = {m: _mid_step_call(loaded, steps, loaded.guidance(m)) for m in METHODS}
    calls |= _part_calls(loaded, steps)
    out_of_memory = [name for name, call in calls.items() if not _fits(call, loaded.device)]
    seconds: dict[str, float | None] = dict(round_robin_median({k: c for k, c in calls.items() if k not in out_of_memory}, repeats))
    if seconds.get("expert_switch") is not None:
        seconds["expert_switch"] /= 2  # type: ignore[operator]
    return {k: None if k in out_of_memory else round(seconds[k], 5) for k in calls}  # type: ignore[arg-type]


def _fits(call: Callable[[], object], device: torch.device) -> bool:
    """Whether ``call`` runs without running out of memory (it is then warm, too)."""
    try:
        call()
        return True
    except (torch.cuda.OutOfMemoryError, MemoryError):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False


def _part_calls(loaded: _Loaded, steps: int) -> dict[str, Callable[[], object]]:
    """The pieces a guided step is made of, each alone."""
    guide, denoiser, bank, dev = loaded.guide, loaded.denoiser, loaded.bank, loaded.device
    x = loaded.noise()
    t = torch.full((loaded.batch,), int(mid_step(loaded.pipe.diffusion, steps).timesteps[0]), device=dev)
    term = loaded.term("naive")
    targets = term.targets.to(dev)
    net_input = guide.preprocess(x.to(next(guide.parameters()).dtype)).detach()

    def unet_forward():
        with torch.no_grad():
            denoiser(x, t)
        _sync(dev)

    def unet_forward_backward():
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(denoiser(xg, t).x0.sum(), xg)
        _sync(dev)

    def guide_forward_backward():  # at the guide's own input size: no resizing in it
        with torch.enable_grad():
            xi = net_input.detach().requires_grad_(True)
            out = guide.postprocess(guide.net(xi), x).float()
            torch.autograd.grad(term.task.log_likelihood(out, term.task.check_target(targets, tuple(out.shape))).sum(), xi)
        _sync(dev)

    def resize_forward_backward():
        with torch.enable_grad():
            xg = x.detach().to(net_input.dtype).requires_grad_(True)
            torch.autograd.grad(guide.preprocess(xg).float().square().sum(), xg)
        _sync(dev)

    here = int(bank.router(t[:1].cpu())[0])  # the mid step's expert, which the PPAP step keeps merged
    there = (here + 1) % bank.router.num_experts

    def expert_switch():  # to a neighbouring expert and back (two switches: halved by measure_times)
        bank.activate(there)
        bank.activate(here)
        _sync(dev)

    return {
        "unet_forward": unet_forward,
        "unet_forward_backward": unet_forward_backward,
        "guide_forward_backward": guide_forward_backward,
        "resize_forward_backward": resize_forward_backward,
        "expert_switch": expert_switch,
    }


def measure_memory(
    diffusion_dir: str, guide_dir: str | None, bank_dir: str | None, device: str, dtype: str, batch: int, steps: int
) -> dict:
    """Peak memory of two mid-noise steps of one method, with only what it needs loaded (the
    bank on the guide itself, no second copy)."""
    loaded = _load(diffusion_dir, guide_dir, bank_dir, device, dtype, batch, guide_copy=False)
    method = "unguided" if guide_dir is None else "ppap" if bank_dir else "naive"
    return _memory_of(loaded, steps, method)


def measure_x0_memory(diffusion_dir: str, guide_dir: str, device: str, dtype: str, batch: int, steps: int) -> dict:
    return _memory_of(_load(diffusion_dir, guide_dir, None, device, dtype, batch), steps, "x0")


def _memory_of(loaded: _Loaded, steps: int, method: str) -> dict:
    call = _mid_step_call(loaded, steps, loaded.guidance(method))
    with PeakMemory(loaded.device) as peak:
        for _ in range(2):
            call()
    loaded_mib = peak.before  # the models and inputs, held before the steps
    return {"peak_mib": peak.mib, "step_mib": peak.above_mib, "loaded_mib": None if loaded_mib is None else round(loaded_mib, 1)}


def build_bank(diffusion_dir: str, guide_dir: str, bank_dir: str, experts: str) -> dict:
    """A bank of the default recipe (TrainConfig: LoRA rank 32, per-expert norms), saved as
    ``ppap train`` saves one, and its size on disk against N full copies of its guide."""
    from ..bank_format import save_bank
    from ..banks import make_bank
    from ..loading import load_diffusion, load_guide
    from ..router import TimestepRouter
    from ..tasks import task_for
    from ..train import TrainConfig

    diffusion, guide = load_diffusion(diffusion_dir), load_guide(guide_dir)
    cfg = TrainConfig(experts=experts)
    task = task_for(guide, diffusion.image_shape, guide.task or "classification", tau=cfg.tau)
    router = TimestepRouter.parse(cfg.experts, diffusion.schedule.num_train_timesteps, diffusion.schedule.alphas_cumprod)
    bank = make_bank(guide, router, cfg.adapter_config(), seed=cfg.seed)
    save_bank(bank, bank_dir, task, diffusion.schedule)
    bank_bytes = sum(f.stat().st_size for f in Path(bank_dir).rglob("*") if f.is_file())
    guide_bytes = sum(f.stat().st_size for f in Path(guide_dir).glob("*.safetensors"))
    return {
        "experts": router.num_experts,
        "rank": cfg.rank,
        "bank_mib": round(bank_bytes / 2**20, 2),
        "guide_mib": round(guide_bytes / 2**20, 2),
        "full_copies_mib": round(router.num_experts * guide_bytes / 2**20, 2),
        "bank_over_guide": round(bank_bytes / guide_bytes, 3),
    }


def measure_train_step(diffusion_dir: str, guide_dir: str, device: str, dtype: str, batch: int, repeats: int, micro_batch: int = 0) -> dict:
    """One expert's training steps through ``train_experts`` (``repeats`` + 1 steps, the first a
    warm-up in the mean) on a random corpus of ``batch`` images: seconds per step and peak memory
    (``micro_batch``: TrainConfig's, samples per forward and backward)."""
    from ..banks import make_bank
    from ..loading import load_diffusion, load_guide, resolve_device
    from ..router import TimestepRouter
    from ..tasks import task_for
    from ..train import TrainConfig, train_experts

    dev = resolve_device(device)
    diffusion, guide = load_diffusion(diffusion_dir), load_guide(guide_dir)
    steps = repeats + 1
    cfg = TrainConfig(batch_size=batch, iterations=steps, warmup=1, checkpoint_every=10**6, micro_batch=micro_batch)
    task = task_for(guide, diffusion.image_shape, guide.task or "classification", tau=cfg.tau)
    router = TimestepRouter.parse(cfg.experts, diffusion.schedule.num_train_timesteps, diffusion.schedule.alphas_cumprod)
    bank = make_bank(guide.to(dev), router, cfg.adapter_config(), seed=cfg.seed)
    if dtype != "float32":
        bank.to(getattr(torch, dtype))
    images = torch.rand((batch,) + diffusion.image_shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(dev) as peak:
        stats = train_experts(bank, task, diffusion.schedule, images, cfg, tmp, only=[0], progress=False)
    return {
        "batch": batch,
        "micro_batch": micro_batch,
        "seconds_per_step": round(stats["expert_0"]["seconds"] / steps, 4),
        "peak_mib": peak.mib,
        "step_mib": peak.above_mib,
    }


def measure_throughput(diffusion_dir: str, device: str, dtype: str, num: int, steps: int, repeats: int) -> dict:
    """Images per second of ppap's ``generate`` (unguided DDIM, as ``ppap generate`` draws a
    corpus) and of diffusers' ``DDIMPipeline`` on the same UNet, batch and steps."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from ..batch_sampling import sample_images
    from ..loading import load_pipeline, resolve_device, resolve_dtype

    dev = resolve_device(device)
    pipe = load_pipeline(diffusion_dir, device=dev, dtype=resolve_dtype(dtype))
    reference = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    reference.set_progress_bar_config(disable=True)
    calls = {
        "ppap": lambda: (
            sample_images(pipe, num, seed=0, batch_size=num, progress=False, num_inference_steps=steps, sampler="ddim"),
            _sync(dev),
        ),
        "diffusers": lambda: (
            reference(batch_size=num, num_inference_steps=steps, eta=0.0, output_type="np", generator=torch.Generator().manual_seed(0)),
            _sync(dev),
        ),
    }
    seconds = round_robin_median(calls, repeats)
    ips = {k: round(num / s, 3) for k, s in seconds.items()}
    return {
        "num": num,
        "steps": steps,
        "ppap_images_per_s": ips["ppap"],
        "diffusers_images_per_s": ips["diffusers"],
        "ratio": round(ips["ppap"] / ips["diffusers"], 3),
    }
