"""Glue a user (or the CLI) needs around the pieces: models by reference, noise, batched sampling.

References: a diffusion model is a zoo name or a diffusers directory; a guidance model is a zoo
name or ``package.module:function`` plus a safetensors file; experts are a zoo name or a
directory written by ``ppap train``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import zoo
from .data import unit_to_uint8
from .diffusion import Diffusion
from .experts import ExpertBank
from .guidance import Calibration, Guide, GuideSpec, build_guide
from .io import PPAPError, load_weights_into, resolve_factory
from .samplers import SAMPLERS
from .tasks import Task, make_task
from .train import load_experts


def load_diffusion(ref: str) -> Diffusion:
    if zoo.is_zoo_name(ref):
        d = Diffusion.from_pretrained(zoo.get(ref, "diffusion").location)
        d.name = ref
        return d
    return Diffusion.from_pretrained(ref)


@dataclass
class GuideModel:
    """An off-the-shelf model with what ppap knows about it."""

    net: nn.Module  # eval mode, frozen, input [-1, 1]
    ref: str  # zoo name or factory reference
    classes: tuple[str, ...] | None = None  # class names when known (zoo models)

    @property
    def identity(self) -> dict:
        return {"ref": self.ref}


def load_guide(ref: str, weights: str | None = None) -> GuideModel:
    """Build and load a guidance model; ``weights`` is required for factory references."""
    if zoo.is_zoo_name(ref):
        entry = zoo.get(ref, "guide")
        net = resolve_factory(entry.factory)()
        load_weights_into(net, weights or entry.location)
        return GuideModel(net.eval().requires_grad_(False), ref, entry.classes)
    factory = resolve_factory(ref)
    if weights is None:
        raise PPAPError(f"--guide {ref} is a factory reference: also pass --guide-weights FILE.safetensors")
    try:
        net = factory()
    except Exception as e:
        raise PPAPError(f"factory {ref} failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise PPAPError(f"factory {ref} returned {type(net).__name__}, not a torch.nn.Module")
    load_weights_into(net, weights)
    return GuideModel(net.eval().requires_grad_(False), ref)


def probe_output_shape(net: nn.Module, image_shape: tuple[int, ...], ref: str = "the guidance model") -> tuple[int, ...]:
    """Run the net once on a blank image of the diffusion model's shape; a net that cannot take
    it fails here with one line instead of deep inside the sampler."""
    try:
        with torch.no_grad():
            out = net(torch.zeros((2,) + tuple(image_shape)))
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise PPAPError(f"{ref} cannot take images of shape {list(image_shape)} from the diffusion model ({msg})") from None
    return tuple(out.shape)


def task_for(guide: GuideModel, image_shape: tuple[int, ...], name: str = "classification", **kwargs) -> Task:
    """The task for a guidance model, with its size (e.g. the class count) read off its output."""
    shape = probe_output_shape(guide.net, image_shape, guide.ref)
    if name == "classification":
        if len(shape) != 2:
            raise PPAPError(f"{guide.ref} gives output of shape {list(shape[1:])} per image, not class logits")
        kwargs.setdefault("num_classes", shape[1])
    elif name == "segmentation":
        if len(shape) != 4:
            raise PPAPError(f"{guide.ref} gives output of shape {list(shape[1:])} per image, not per-pixel logits [K, H, W]")
        kwargs.setdefault("num_classes", shape[1])
    return make_task(name, **kwargs)


def load_bank(ref: str, guide: GuideModel, diffusion: Diffusion) -> tuple[ExpertBank, Task]:
    directory = zoo.get(ref, "experts").location if zoo.is_zoo_name(ref) else Path(ref)
    return load_experts(guide.net, directory, schedule=diffusion.schedule)


def parse_class_targets(spec: str, num: int, num_classes: int, classes: tuple[str, ...] | None = None) -> Tensor:
    """``'3'``, ``'sneaker'``, ``'0,7,9'`` (cycled) or ``'all'`` (0..K-1 cycled) -> [num] int64."""
    names = {c.lower(): i for i, c in enumerate(classes or ())}
    if spec.strip().lower() == "all":
        values = list(range(num_classes))
    else:
        values = []
        for part in spec.split(","):
            part = part.strip().lower()
            if part.lstrip("-").isdigit():
                values.append(int(part))
            elif part in names:
                values.append(names[part])
            else:
                valid = f" or one of: {', '.join(classes)}" if classes else ""
                raise PPAPError(f"bad class target {part!r}: use an index 0..{num_classes - 1}{valid}")
    for v in values:
        if not 0 <= v < num_classes:
            raise PPAPError(f"class index {v} is out of range: the guidance model has {num_classes} classes (0..{num_classes - 1})")
    return torch.tensor([values[k % len(values)] for k in range(num)], dtype=torch.long)


def initial_noise(num: int, shape: tuple[int, ...], seed: int, start: int = 0) -> Tensor:
    """x_T for samples start..start+num-1: sample k's noise depends only on (seed, k), so a
    sample is the same whatever the batch size, the process count or the resume point."""
    out = torch.empty((num,) + tuple(shape))
    for j in range(num):
        digest = hashlib.sha256(f"ppap-noise:{seed}:{start + j}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        out[j] = torch.randn(shape, generator=g)
    return out


def sample_images(
    diffusion: Diffusion,
    num: int,
    *,
    seed: int,
    make_guide: Callable[[Tensor], Guide | None] = lambda target: None,
    targets: Tensor | None = None,
    steps: int = 25,
    sampler: str = "ddim",
    eta: float = 0.0,
    batch_size: int = 64,
    start: int = 0,
    progress: bool = True,
    desc: str = "sampling",
) -> Tensor:
    """``num`` images as float [N, C, H, W] in [-1, 1]. ``make_guide(targets_of_batch)`` builds
    the guide for each batch (None = unguided); ``targets`` [N] are per-sample targets."""
    if sampler not in SAMPLERS:
        raise PPAPError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    timesteps = diffusion.schedule.timesteps(steps)
    extra = {"eta": eta} if sampler == "ddim" else {}
    out = []
    bar = tqdm(total=num, desc=desc, unit="img", disable=not progress)
    for b0 in range(0, num, batch_size):
        n = min(batch_size, num - b0)
        x_T = initial_noise(n, diffusion.image_shape, seed, start + b0)
        g = torch.Generator().manual_seed(seed * 7919 + start + b0)  # DDPM / eta>0 noise
        guide = make_guide(targets[b0 : b0 + n] if targets is not None else None)
        out.append(SAMPLERS[sampler](diffusion, x_T, timesteps, guide=guide, generator=g, **extra).clamp(-1, 1))
        bar.update(n)
    bar.close()
    return torch.cat(out) if out else torch.empty((0,) + diffusion.image_shape)


def generate_corpus(diffusion: Diffusion, root, spec, *, batch_size: int = 64, rank: int = 0, world: int = 1,
                    shards: list[int] | None = None, progress: bool = True) -> int:
    """Draw the shards of corpus ``spec`` that ``root`` still lacks; with ``world`` processes,
    rank r takes every world-th missing shard (or exactly ``shards``, as a caller that hands
    them out chose). Returns how many shards this call wrote. The caller opens the corpus
    (``data.open_corpus``) once, on one process, before."""
    from .data import open_corpus, write_shard

    missing = open_corpus(root, spec)
    mine = missing[rank::world] if shards is None else [k for k in shards if k in missing]
    for k in tqdm(mine, desc="corpus" if world == 1 else f"corpus (rank {rank})", unit="shard", disable=not progress):
        x = sample_images(diffusion, spec.shard_count(k), seed=spec.seed, start=k * spec.shard_size, steps=spec.steps,
                          eta=spec.eta, batch_size=batch_size, progress=False)
        write_shard(Path(root), k, torch.from_numpy(to_hwc_uint8(x)))
    return len(mine)


def corpus_spec(diffusion: Diffusion, ref: str, num: int, *, shard_size: int = 256, steps: int = 25, eta: float = 0.0, seed: int = 0):
    from .data import CorpusSpec
    from .io import fingerprint

    if num < 1 or shard_size < 1:
        raise PPAPError(f"corpus size and shard size must be >= 1 (got {num}, {shard_size})")
    return CorpusSpec(model=f"{ref}@{fingerprint(diffusion.unet.state_dict())[:16]}", num_samples=num, shard_size=shard_size,
                      steps=steps, eta=eta, seed=seed,
                      schedule={"num_train_timesteps": diffusion.schedule.num_train_timesteps,
                                "beta_schedule": diffusion.schedule.config.get("beta_schedule")})


def data_free_experts(diffusion: Diffusion, diffusion_ref: str, guide: GuideModel, work_dir, *, corpus_size: int,
                      cfg, corpus_steps: int = 25, task_name: str = "classification", corpus_dir=None, progress: bool = True):
    """The whole data-free PPAP recipe: sample a corpus from the diffusion model (no labels),
    then distill the off-the-shelf model into noise-range experts. Resumable at every stage.
    Returns (bank, task, stats); experts are saved in ``work_dir/experts``, the corpus in
    ``corpus_dir`` (default ``work_dir/corpus``)."""
    from .data import load_corpus, open_corpus
    from .experts import TimestepRouter, make_bank
    from .train import train_experts

    work_dir = Path(work_dir)
    spec = corpus_spec(diffusion, diffusion_ref, corpus_size, steps=corpus_steps, seed=cfg.seed)
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else work_dir / "corpus"
    open_corpus(corpus_dir, spec)
    generate_corpus(diffusion, corpus_dir, spec, progress=progress)
    images = load_corpus(corpus_dir)
    task = task_for(guide, diffusion.image_shape, task_name, tau=cfg.tau)
    router = TimestepRouter.parse(cfg.experts, diffusion.schedule.num_train_timesteps, diffusion.schedule.alphas_cumprod)
    bank = make_bank(guide.net, router, cfg.adapter_config(), seed=cfg.seed)
    stats = train_experts(bank, task, diffusion.schedule, images, cfg, work_dir / "experts", identity=guide.identity, progress=progress)
    return bank, task, stats


def to_hwc_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return unit_to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [H', W', C] grid, ``nrow`` images per row."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[k]
    return grid


def guide_builder(method: str, *, task: Task, scale: float, guide: GuideModel | None = None,
                  experts: ExpertBank | None = None, diffusion: Diffusion | None = None,
                  calibration: Calibration | None = None) -> Callable[[Tensor], Guide | None]:
    """A per-batch guide factory for ``sample_images`` (validates the method once, up front)."""
    calibration = calibration or Calibration()

    def make(target: Tensor | None) -> Guide | None:
        spec = GuideSpec(task=task, target=target, scale=scale, net=guide.net if guide else None, experts=experts,
                         diffusion=diffusion, calibration=calibration)
        return build_guide(method, spec)

    if method != "unguided":
        make(torch.zeros(1, dtype=torch.long))  # raises now for a method missing its model
    return make


# --------------------------------------------------------------------------------------------
# Dense targets and composed guidance
# --------------------------------------------------------------------------------------------


def load_reference_image(path: str | Path, image_shape: tuple[int, ...]) -> Tensor:
    """A PNG/JPEG reference as [1, C, H, W] in [-1, 1]; it must have the diffusion model's size."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise PPAPError(f"reference image not found: {path}")
    try:
        img = Image.open(path)
        img = img.convert("L" if image_shape[0] == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise PPAPError(f"cannot read reference image {path} ({type(e).__name__})") from None
    if (img.height, img.width) != tuple(image_shape[1:]):
        raise PPAPError(f"reference image {path} is {img.width}x{img.height} but the diffusion model makes "
                        f"{image_shape[2]}x{image_shape[1]} images")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x[None].float().div(127.5).sub(1.0)


def load_target_map(path: str | Path) -> Tensor:
    """A target map from ``.npy`` (no pickles): [H, W] / [C, H, W] or a stack [N, ...]."""
    path = Path(path)
    if not path.is_file():
        raise PPAPError(f"target map not found: {path}")
    if path.suffix.lower() != ".npy":
        raise PPAPError(f"--target-map must be a .npy file, got {path.name}")
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except ValueError as e:
        raise PPAPError(f"cannot read target map {path} ({e})") from None


def dense_targets(task: Task, guide: GuideModel, num: int, image_shape: tuple[int, ...], *, target_image=None,
                  target_map=None) -> Tensor:
    """[num, ...] targets for a segmentation or dense task: the clean off-the-shelf model's output
    on a reference image (as the paper does with DeepLabV3 / MiDaS), or a given map; a single
    map is repeated, a stack of maps is cycled. Shapes are checked against the model's output."""
    if (target_image is None) == (target_map is None):
        raise PPAPError(f"a {task.name} guide needs exactly one of --target-image or --target-map")
    out_shape = probe_output_shape(guide.net, image_shape, guide.ref)
    if target_image is not None:
        with torch.no_grad():
            maps = task.target_from_output(guide.net(load_reference_image(target_image, image_shape)))
    else:
        maps = load_target_map(target_map)
        per_sample = 2 if task.name == "segmentation" else 3  # [H, W] label map / [C, H, W] dense map
        if task.name == "dense" and maps.ndim == 2 and out_shape[1] == 1:
            maps = maps[None]  # an [H, W] map for a one-channel model
        maps = maps[None] if maps.ndim == per_sample else maps
        if task.name == "segmentation" and maps.is_floating_point() and bool((maps == maps.round()).all()):
            maps = maps.long()  # integer labels stored as floats
        if task.name == "dense":
            maps = maps.float() if not maps.is_floating_point() else maps
    maps = task.check_target(maps, (len(maps),) + tuple(out_shape[1:]))
    return maps[torch.arange(num) % len(maps)]


@dataclass
class GuidanceTerm:
    """One summand of composed guidance: a model, its task, per-sample targets and a scale."""

    make: Callable[[Tensor], Guide | None]
    targets: Tensor  # [num, ...]
    description: str


def parse_term(spec: str) -> dict[str, str]:
    """``'guide=fashion-classifier,experts=fashion-ppap5,target=ankle boot,scale=30'`` -> dict."""
    keys = {"guide", "guide_weights", "experts", "method", "task", "target", "target_image", "target_map", "scale", "calibration"}
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in keys:
            raise PPAPError(f"bad guidance term part {part!r}; use key=value with keys: {', '.join(sorted(keys))}")
        out[key] = value.strip()
    if "guide" not in out:
        raise PPAPError(f"guidance term {spec!r} has no guide=...")
    return out


def build_term(diffusion: Diffusion, num: int, *, guide: str, guide_weights: str | None = None, experts: str | None = None,
               method: str = "ppap", task: str | None = None, target: str | None = None, target_image: str | None = None,
               target_map: str | None = None, scale: float | str | None = None, calibration: Calibration | None = None) -> GuidanceTerm:
    """Load what one guidance term needs and resolve its targets (class, label map or dense map).
    The task comes from the experts' manifest, else the zoo entry, else ``task`` (default classification).
    ``scale`` defaults to the zoo experts' measured best (method ppap), else ``DEFAULT_SCALE``."""
    scale = _guidance_scale(scale, experts, method)
    model = load_guide(guide, guide_weights)
    bank = None
    if experts:
        bank, bank_task = load_bank(experts, model, diffusion)
        model = load_guide(guide, guide_weights)  # a clean copy for targets and naive guidance (the bank adapted the first)
        the_task = bank_task
    else:
        name = task or (zoo.ZOO[guide].task if zoo.is_zoo_name(guide) else "classification")
        the_task = task_for(model, diffusion.image_shape, name)
    if the_task.name == "classification":
        if target_image is not None or target_map is not None:
            raise PPAPError("--target-image / --target-map are for segmentation or dense guides; a classifier takes --target CLASS")
        targets = parse_class_targets(target if target is not None else "0", num, the_task.num_classes, model.classes)
    else:
        targets = dense_targets(the_task, model, num, diffusion.image_shape, target_image=target_image, target_map=target_map)
    make = guide_builder(method, task=the_task, scale=scale, guide=model, experts=bank, diffusion=diffusion,
                         calibration=calibration)
    return GuidanceTerm(make, targets, f"{method} {guide} ({the_task.name}) x{scale:g}")


DEFAULT_SCALE = 30.0  # the classifier zoo's best (docs/BENCHMARKS.md); per-pixel dense losses need far larger ones


def _guidance_scale(scale: float | str | None, experts: str | None, method: str) -> float:
    if scale is None:
        entry = zoo.ZOO.get(experts or "")
        return entry.scale if entry is not None and entry.scale is not None and method == "ppap" else DEFAULT_SCALE
    try:
        return float(scale)
    except ValueError:
        raise PPAPError(f"bad guidance scale {scale!r}: expected a number") from None


def compose(terms: list[GuidanceTerm]) -> Callable[[Tensor], Guide | None]:
    """A ``make_guide`` for ``sample_images(targets=torch.arange(num))``: each batch's sample
    indices select every term's own targets, and the guides are summed (``SumGuide``)."""
    from .guidance import SumGuide

    def make(index: Tensor) -> Guide | None:
        guides = [g for g in (t.make(t.targets[index]) for t in terms) if g is not None]
        return SumGuide(guides) if guides else None

    return make
