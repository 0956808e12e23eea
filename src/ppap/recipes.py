"""Training recipes for the zoo's own models on Fashion-MNIST (``ppap zoo train NAME``).

Each recipe is seeded, shows progress, checkpoints to ``work_dir`` (git-ignored) and resumes
exactly: batch ``s`` and its noise are pure functions of ``(seed, s)``, so a run killed at any
point and restarted ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .diffusion import Diffusion, NoiseSchedule
from .fashion_mnist import load_fashion_mnist
from .io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, check_same_settings, load_resume_state
from .train import InfiniteBatches, TrainConfig


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _same_recipe(saved: dict, recipe, ckpt: Path, free: tuple[str, ...] = ("checkpoint_every",)) -> None:
    """Refuse a checkpoint made with another recipe; the ``free`` fields may differ."""
    now = asdict(recipe)
    check_same_settings(saved, now, f"{ckpt} was made with another recipe", f"delete {ckpt.parent} to start over", keys=now, ignore=free)


# --------------------------------------------------------------------------------------------
# fashion-ddpm
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDPMRecipe:
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # UNet widths per resolution 32/16/8
    layers_per_block: int = 1  # ResNet blocks per resolution
    attention_level: int = 1  # which resolution gets self-attention (1 = 16x16)
    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "linear"  # DDPM's linear betas 1e-4..0.02
    iterations: int = 4000  # optimiser steps
    batch_size: int = 64
    lr: float = 5e-4  # AdamW, after a linear warm-up
    warmup: int = 200
    ema_decay: float = 0.9995  # with the usual (1+s)/(10+s) warm-up
    checkpoint_every: int = 250
    seed: int = 0


def build_fashion_unet(r: DDPMRecipe):
    from diffusers import UNet2DModel

    n = len(r.block_out_channels)
    down = tuple("AttnDownBlock2D" if i == r.attention_level else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if n - 1 - i == r.attention_level else "UpBlock2D" for i in range(n))
    return UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=r.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=r.layers_per_block,
        norm_num_groups=8,
    )


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def train_ddpm(
    out_dir: str | Path,
    work_dir: str | Path,
    r: DDPMRecipe = DDPMRecipe(),
    data_dir=None,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train the unconditional Fashion-MNIST DDPM; export EMA weights as a diffusers pipeline dir.

    ``stop_after`` ends this call after that many steps (checkpointed), for time-sliced runs.
    """
    x_all, _ = load_fashion_mnist("train", data_dir)
    spec = DenoiserTraining("fashion-ddpm", lambda: build_fashion_unet(r), (x_all,), lambda batch, g: (batch[0], ()), export_ddpm)
    return train_denoiser(spec, r, out_dir, work_dir, stop_after=stop_after, device=device)


@dataclass(frozen=True)
class DenoiserTraining:
    """What ``train_denoiser`` trains, besides the recipe's numbers."""

    name: str  # the progress bar's label
    build: Callable[[], nn.Module]  # the trained model, from the global RNG: (x_t, t, *inputs) -> eps (or an output with .sample)
    data: tuple[Tensor, ...]  # per-image tensors [N, ...], batched together
    inputs: Callable[[tuple[Tensor, ...], torch.Generator], tuple[Tensor, tuple]]  # a batch, the step's generator -> (x0, inputs)
    export: Callable[[nn.Module, Any, Path], None]  # (EMA model, DDPMScheduler, out_dir): write the pipeline


def train_denoiser(
    spec: DenoiserTraining,
    r,
    out_dir: str | Path,
    work_dir: str | Path,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """The DDPM loop (epsilon loss at uniform t, AdamW with linear warm-up, EMA) of a recipe with
    ``DDPMRecipe``'s training fields; checkpoints to ``work_dir/resume.pt`` and resumes exactly
    (batch s, its t, noise and ``spec.inputs`` draws are functions of (seed, s)); exports the EMA
    model with ``spec.export`` and writes its card when all ``r.iterations`` are done.

    On another ``device`` the initial weights and every draw are still made on the CPU (the same
    numbers on every machine) and moved; only the arithmetic runs there. A checkpoint written on
    one device resumes on any other."""
    from diffusers import DDPMScheduler

    device = torch.device(device)
    work_dir = Path(work_dir)
    torch.manual_seed(r.seed)  # only the initial weights draw from the global RNG, and only here
    unet = spec.build()
    ema = spec.build()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    unet.to(device)
    ema.to(device)
    sched = DDPMScheduler(num_train_timesteps=r.num_train_timesteps, beta_schedule=r.beta_schedule, prediction_type="epsilon")
    schedule = NoiseSchedule.from_diffusers(sched)
    opt = torch.optim.AdamW(unet.parameters(), lr=r.lr, weight_decay=0.0)
    ckpt = work_dir / "resume.pt"
    step, elapsed, losses = 0, 0.0, []
    if ckpt.exists():
        state = load_resume_state(ckpt)
        _same_recipe(state["recipe"], r, ckpt, free=("iterations", "checkpoint_every"))  # the lr is constant after warm-up
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    batches = InfiniteBatches(*spec.data, batch_size=r.batch_size, seed=r.seed)

    def save():
        atomic_torch_save(
            ckpt,
            {
                "recipe": asdict(r),
                "model": unet.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "losses": losses,
            },
        )

    end = r.iterations if stop_after is None else min(r.iterations, step + stop_after)
    unet.train()
    bar = tqdm(total=r.iterations, initial=step, desc=spec.name, unit="it")
    t_start = time.time() - elapsed
    run_loss = 0.0
    while step < end:
        g = step_generator(r.seed, step)
        x0, inputs = spec.inputs(batches.batch(step), g)
        t = torch.randint(0, r.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        inputs = tuple(i.to(device) for i in inputs)
        out = unet(schedule.q_sample(x0, t, noise), t, *inputs)
        loss = F.mse_loss(getattr(out, "sample", out), noise)
        for group in opt.param_groups:
            group["lr"] = r.lr * min(1.0, (step + 1) / r.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        _ema_update(ema, unet, min(r.ema_decay, (1 + step) / (10 + step)))
        run_loss += loss.item()
        bar.update(1)
        if step % 50 == 0:
            losses.append(run_loss / 50)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            run_loss = 0.0
        if step % r.checkpoint_every == 0 or step == end:
            elapsed = time.time() - t_start
            save()
    bar.close()
    if step < r.iterations:
        return {"step": step, "done": False}
    spec.export(ema.to("cpu"), sched, Path(out_dir))
    card = {
        "recipe": asdict(r),
        "iterations": step,
        "train_seconds": round(elapsed, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,  # of the last run
        "final_loss_ema50": losses[-1] if losses else math.nan,
        "parameters": sum(p.numel() for p in ema.parameters()),
    }
    atomic_write_json(Path(out_dir) / "ppap_card.json", card)
    return card | {"done": True}


def export_ddpm(ema: nn.Module, scheduler, out_dir: str | Path) -> None:
    """Write the pipeline directory next to ``out_dir`` and swap it in (no half-written model)."""
    swap_in_dir(out_dir, Diffusion(ema, NoiseSchedule.from_diffusers(scheduler)).save_pretrained)


def swap_in_dir(out_dir: str | Path, write: Callable[[Path], None]) -> None:
    """``write`` a folder next to ``out_dir``, then swap it in (no half-written model)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# fashion-classifier (the off-the-shelf guide), fashion-evaluator (the judge), and the dense
# off-the-shelf models fashion-segmenter and fashion-edges: one supervised loop on clean images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierRecipe:
    factory: str  # "package.module:function" building the network
    epochs: float = 6  # passes over the 60k training images
    batch_size: int = 128
    lr: float = 2e-3  # AdamW peak, cosine-decayed to 0 over the run
    weight_decay: float = 0.05
    augment: bool = False  # random +-2 px shifts and horizontal flips
    label_smoothing: float = 0.0
    checkpoint_every: int = 200
    seed: int = 0
    target: str = "class"  # "class" | "segmentation" (bg + class per pixel) | "sobel" (edge map)


CLASSIFIER_RECIPES = {
    # clean images only, no noise or augmentation: the typical off-the-shelf model PPAP adapts
    "fashion-classifier": ClassifierRecipe("ppap.models:fashion_classifier", epochs=5),
    # a different architecture, trained separately with augmentation, used only to measure
    "fashion-evaluator": ClassifierRecipe("ppap.models:fashion_evaluator", epochs=8, augment=True, label_smoothing=0.1, seed=1),
    # dense off-the-shelf models, clean images only (like DeepLabV3 / MiDaS: they fail on noise)
    "fashion-segmenter": ClassifierRecipe("ppap.models:fashion_segmenter", epochs=2, target="segmentation", seed=2),
    "fashion-edges": ClassifierRecipe("ppap.models:fashion_edges", epochs=2, target="sobel", seed=3),
}


def augment_batch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random +-2 px translation (zero = -1 padding) and horizontal flip, per sample."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (b,), generator=g), torch.randint(0, 5, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(x.shape[2]))[:, :, None]
    cols = (dx[:, None] + torch.arange(x.shape[3]))[:, None, :]
    out = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _supervision(r: ClassifierRecipe, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from .models import segmentation_labels, sobel_magnitude

    if r.target == "class":
        return y
    return segmentation_labels(x, y) if r.target == "segmentation" else sobel_magnitude(x)


def _loss(r: ClassifierRecipe, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if r.target == "sobel":
        return (out - target).abs().mean()
    return F.cross_entropy(out, target, label_smoothing=r.label_smoothing)


@torch.no_grad()
def test_figures(r: ClassifierRecipe, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The model card's test figures: accuracy; pixel accuracy and mIoU; or L1 to Sobel."""
    from .metrics import accuracy, mean_iou, predict

    if r.target == "class":
        return {"test_accuracy": accuracy(net.eval(), x, y)}
    out = predict(net, x)
    truth = _supervision(r, x, y)
    if r.target == "sobel":
        return {"test_l1": (out - truth).abs().mean().item()}
    pred = out.argmax(1)
    return {"test_pixel_accuracy": (pred == truth).float().mean().item(), "test_miou": mean_iou(pred, truth, out.shape[1])}


def train_classifier(
    name: str, out_file: str | Path, work_dir: str | Path, r: ClassifierRecipe | None = None, data_dir=None, stop_after: int | None = None
) -> dict:
    """Supervised training of a zoo model on clean Fashion-MNIST; writes safetensors + card."""
    from .io import resolve_factory

    r = r or CLASSIFIER_RECIPES[name]
    torch.manual_seed(r.seed)
    net = resolve_factory(r.factory)()
    x_train, y_train = load_fashion_mnist("train", data_dir)

    def step_loss(batch: tuple[Tensor, ...], step: int) -> Tensor:
        x, y = batch
        if r.augment:
            x = augment_batch(x, step_generator(r.seed, step))
        return _loss(r, net(x), _supervision(r, x, y))

    step, total, elapsed = train_supervised(name, net, (x_train, y_train), step_loss, r, work_dir, stop_after)
    if step < total:
        return {"step": step, "done": False}
    x_test, y_test = load_fashion_mnist("test", data_dir)
    figures = test_figures(r, net, x_test, y_test)
    atomic_save_safetensors(out_file, net.state_dict(), metadata={"ppap_zoo": name})
    card = {
        "recipe": asdict(r),
        "iterations": step,
        "train_seconds": round(elapsed, 1),
        **figures,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    atomic_write_json(Path(out_file).with_suffix(".json"), card)
    return card | {"done": True}


def train_supervised(
    name: str,
    net: nn.Module,
    data: tuple[Tensor, ...],
    step_loss: Callable[[tuple[Tensor, ...], int], Tensor],
    r,
    work_dir: str | Path,
    stop_after: int | None = None,
) -> tuple[int, int, float]:
    """The supervised loop of a recipe with ``ClassifierRecipe``'s training fields: ``r.epochs``
    passes over ``data`` (seeded batches), AdamW with a cosine-decayed lr, ``step_loss(batch,
    step)``; checkpoints to ``work_dir/resume.pt`` and resumes exactly. ``net`` is built by the
    caller (seeded). Returns (steps done, steps in all, seconds)."""
    work_dir = Path(work_dir)
    batches = InfiniteBatches(*data, batch_size=r.batch_size, seed=r.seed)
    total = int(r.epochs * len(data[0])) // r.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    ckpt = work_dir / "resume.pt"
    step, elapsed = 0, 0.0
    if ckpt.exists():
        state = load_resume_state(ckpt)
        _same_recipe(state["recipe"], r, ckpt)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
    end = total if stop_after is None else min(total, step + stop_after)
    t_start = time.time() - elapsed
    net.train()
    bar = tqdm(total=total, initial=step, desc=name, unit="it")
    while step < end:
        for group in opt.param_groups:
            group["lr"] = r.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = step_loss(batches.batch(step), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % r.checkpoint_every == 0 or step == end:
            elapsed = time.time() - t_start
            atomic_torch_save(
                ckpt, {"recipe": asdict(r), "model": net.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed}
            )
    bar.close()
    return step, total, elapsed


# --------------------------------------------------------------------------------------------
# fashion-ppap5: data-free LoRA experts of fashion-classifier on fashion-ddpm samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertRecipe:
    diffusion: str = "fashion-ddpm"
    guide: str = "fashion-classifier"
    corpus_size: int = 4000  # unlabelled images sampled from the DDPM, 25 steps of ``sampler``
    sampler: str = "ddim"  # the corpus' sampler: "ddim" (eta 0) or "ddpm" (the pipeline's ancestral steps)
    train: TrainConfig | None = None  # filled in EXPERT_RECIPES
    task: str = "classification"  # the guide's task (its KD loss)
    # a text-conditional diffusion model: corpus sample k is drawn with prompts[k mod len(prompts)],
    # at this classifier-free guidance scale against the empty prompt (the pipeline's own encoding)
    prompts: tuple[str, ...] = ()
    cfg_scale: float = 1.0


def _expert_recipes() -> dict:
    from .fashion_rgb import COLOUR_NAMES, colour_prompt

    colour_cycle = tuple(colour_prompt(c) for c in COLOUR_NAMES)  # "a red garment", "a green garment", ...
    return {
        "fashion-ppap5": ExpertRecipe(
            corpus_size=4000,
            train=TrainConfig(experts="5", iterations=1500, batch_size=64, lr=1e-3, tau=1.0, rank=32, alpha=32, warm_start=True),
        ),
        # dense experts: same corpus (no labels); KD = per-pixel KL at tau 1 / L1 to the teacher's
        # map; the classifier's rank 32 and warm-started chain (docs/findings.md, the dense experts)
        "fashion-segmenter-ppap5": ExpertRecipe(
            guide="fashion-segmenter",
            task="segmentation",
            corpus_size=4000,
            train=TrainConfig(experts="5", iterations=1000, batch_size=64, lr=1e-3, tau=1.0, rank=32, alpha=32, warm_start=True),
        ),
        "fashion-edges-ppap5": ExpertRecipe(
            guide="fashion-edges",
            task="dense",
            corpus_size=4000,
            train=TrainConfig(experts="5", iterations=800, batch_size=32, lr=1e-3, tau=1.0, rank=32, alpha=32, warm_start=True),
        ),
        # the colour world: one corpus of the text-conditional DDPM's samples, prompts cycled over
        # the 8 colours, DDPM-25 (its DDIM-25 samples are a skewed garment mix) without classifier-free
        # guidance: CFG 3 draws sandals and sneakers 6 and 2 times more rarely, and the classifier's
        # experts on a CFG-3 corpus scored 95.8% against 97.6% at the same scale (docs/results.md, the
        # text-conditional colour setting); distilled from the transformers guides with the grey recipes' settings
        "fashion-rgb-ppap5": ExpertRecipe(
            diffusion="fashion-rgb-ddpm",
            guide="fashion-rgb-classifier",
            corpus_size=4000,
            sampler="ddpm",
            prompts=colour_cycle,
            cfg_scale=1.0,
            train=TrainConfig(experts="5", iterations=1500, batch_size=64, lr=1e-3, tau=1.0, rank=32, alpha=32, warm_start=True),
        ),
        "fashion-rgb-segmenter-ppap5": ExpertRecipe(
            diffusion="fashion-rgb-ddpm",
            guide="fashion-rgb-segmenter",
            task="segmentation",
            corpus_size=4000,
            sampler="ddpm",
            prompts=colour_cycle,
            cfg_scale=1.0,
            train=TrainConfig(experts="5", iterations=1000, batch_size=64, lr=1e-3, tau=1.0, rank=32, alpha=32, warm_start=True),
        ),
    }


EXPERT_RECIPES = _expert_recipes()


def shared_corpus_dir(
    work_root: str | Path, diffusion: str, size: int, prompts: tuple[str, ...] = (), cfg_scale: float = 1.0, sampler: str = "ddim"
) -> Path:
    """Corpora are shared by every recipe (and the bench) that draws the same images; a corpus
    drawn with another sampler than DDIM has its name in its own, one drawn with prompts their
    (and the CFG scale's) hash."""
    name = f"{diffusion}-{size}" + ("" if sampler == "ddim" else f"-{sampler}")
    if prompts:
        name += "-p" + hashlib.sha256(json.dumps([list(prompts), float(cfg_scale)]).encode()).hexdigest()[:8]
    return Path(work_root).parent / "corpus" / name


def cycled_prompt_conditioning(pipe, prompts: tuple[str, ...], num: int, cfg_scale: float):
    """The ``Conditioning`` of ``num`` samples, sample k prompted with ``prompts[k mod P]`` and
    encoded as ``pipe(prompt=[...])`` encodes a list of prompts (the empty prompt for CFG): a
    batch of it is the pipeline's own sample of those prompts."""
    cycle = [prompts[k % len(prompts)] for k in range(num)]
    embeds, negative = pipe.encode_prompt(cycle, do_classifier_free_guidance=cfg_scale > 1)
    return pipe.conditioning(num, prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=cfg_scale)


def train_zoo_experts(name: str, out_dir: str | Path, work_dir: str | Path, r: ExpertRecipe | None = None) -> dict:
    """Corpus + experts in ``work_dir`` (resumable); the finished experts are swapped into ``out_dir``.
    The corpus lives beside the zoo work folder (``runs/corpus``), shared with other recipes."""
    from .bank_format import load_manifest
    from .loading import load_guide, load_pipeline
    from .train import data_free_experts

    r = r or EXPERT_RECIPES[name]
    t0 = time.time()
    pipe = load_pipeline(r.diffusion, device="cpu")
    corpus = shared_corpus_dir(Path(work_dir).parent, r.diffusion, r.corpus_size, r.prompts, r.cfg_scale, r.sampler)
    cond = cycled_prompt_conditioning(pipe, r.prompts, r.corpus_size, r.cfg_scale) if r.prompts else None
    data_free_experts(
        pipe,
        r.diffusion,
        load_guide(r.guide),
        work_dir,
        corpus_size=r.corpus_size,
        corpus_sampler=r.sampler,
        cfg=r.train,
        task_name=r.task,
        corpus_dir=corpus,
        conditioning=cond,
        prompts=r.prompts or None,
    )
    out_dir, tmp = Path(out_dir), Path(out_dir).with_name(Path(out_dir).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(work_dir) / "experts", tmp, ignore=shutil.ignore_patterns(".resume", ".lock"))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    card = {
        "recipe": {
            "diffusion": r.diffusion,
            "guide": r.guide,
            "task": r.task,
            "corpus_size": r.corpus_size,
            "corpus_sampler": r.sampler,
            "train": asdict(r.train),
        }
        | ({"prompts": list(r.prompts), "cfg_scale": r.cfg_scale} if r.prompts else {}),
        "seconds_this_call": round(time.time() - t0, 1),
        # every expert's, also those a resumed call read back (the call itself returns only its own)
        "stats": load_manifest(out_dir)["stats"],
    }
    atomic_write_json(out_dir / "ppap_card.json", card)
    return card
