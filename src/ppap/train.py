"""Training noise-range experts: one loop for PPAP and for the supervised baselines.

For expert i owning [lo, hi): draw t ~ U[lo, hi), x_t = q_sample(x0, t, eps) and minimise
  * ``objective="distill"`` (PPAP, data-free): task.distill_loss(expert_i(x_t), teacher(x0)),
    the teacher being the frozen off-the-shelf net on the *clean* image;
  * ``objective="supervised"``: task.supervised_loss(expert_i(x_t), label) on labelled images.
Whether experts are LoRA adapters or full copies is the bank's business (``AdapterConfig``).

Batch ``s`` of expert ``i`` (images, t, noise) is a pure function of ``(seed, i, s)`` and the
global batch is split across processes, so resuming, or running on 1 or 2 processes, sees the
same data. Under ``accelerate launch`` gradients are averaged across processes (data parallel).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .bank_format import BANK_MANIFEST, bank_manifest, expert_name, record_expert
from .banks import ExpertBank
from .config import TrainConfig
from .diffusion import NoiseSchedule
from .distributed import main_decides
from .io import PPAPError, atomic_torch_save, atomic_write_json, check_same_settings, exclusive_lock, load_resume_state, read_json
from .tasks import Task

RUN_LOCK = ".lock"  # held by the one `ppap train` writing an experts folder
T = TypeVar("T")


class InfiniteBatches:
    """Deterministic, resumable minibatches over a fixed tensor set.

    Batch ``step`` is a pure function of ``(seed, step)``: sample k of the flat stream is element
    ``perm_e[k mod N]`` of epoch ``e = k // N``'s permutation. A resumed run therefore sees
    exactly the batches it would have seen, with none lost or repeated. With ``weights`` [N], an
    epoch is N draws with replacement in proportion to them (a re-weighted corpus), equally seeded.
    """

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int, weights: Tensor | None = None):
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors need the same first dimension")
        if n == 0:
            raise PPAPError("cannot draw batches from an empty dataset")
        if weights is not None and (weights.shape != (n,) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0):
            raise ValueError(f"weights must be [{n}], non-negative and not all zero")
        self.tensors, self.batch_size, self.seed, self.n, self.weights = tensors, batch_size, seed, n, weights
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm_cache[epoch] = (
                torch.randperm(self.n, generator=g)
                if self.weights is None
                else torch.multinomial(self.weights.double().cpu(), self.n, replacement=True, generator=g)
            )
        return self._perm_cache[epoch]

    def indices(self, step: int) -> Tensor:
        k = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, pos = k // self.n, k % self.n
        return (
            torch.stack([self._perm(int(e))[int(p)] for e, p in zip(epochs, pos)])
            if epochs[0] != epochs[-1]
            else self._perm(int(epochs[0]))[pos]
        )

    def batch(self, step: int) -> tuple[Tensor, ...]:
        idx = self.indices(step)
        return tuple(t[idx] for t in self.tensors)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return max(0.0, 1 - (step - cfg.warmup) / max(1, cfg.iterations - cfg.warmup))


class _Dist:
    """The little of accelerate the loop needs; a single process when no accelerator is given."""

    def __init__(self, accelerator=None, device: torch.device | None = None):
        self.acc = accelerator
        self.world = accelerator.num_processes if accelerator else 1
        self.rank = accelerator.process_index if accelerator else 0
        self.device = accelerator.device if accelerator else (device or torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean_(self, tensors: list[Tensor]) -> None:
        if self.world == 1:
            return
        for t in tensors:
            t.copy_(self.acc.reduce(t, reduction="mean"))

    def mean(self, value: Tensor) -> float:
        """The mean of a scalar over the processes: the same number on every process."""
        return value.item() if self.world == 1 else self.acc.reduce(value.detach().clone(), reduction="mean").item()

    def decide(self, fn: Callable[[], T]) -> T:
        """``fn`` on the main process; its result, or its error, on every process."""
        return main_decides(self.acc, fn)


def _norm_buffers(bank: ExpertBank, i: int) -> list[Tensor]:
    tag = f".{expert_name(i)}."
    return [b for n, b in bank.named_buffers() if b.is_floating_point() and (tag in n or n.startswith(f"experts.{expert_name(i)}."))]


@torch.no_grad()
def teacher_outputs(bank: ExpertBank, images: Tensor, batch_size: int = 256, progress: bool = True) -> Tensor:
    """The frozen off-the-shelf net on every clean image, computed once (it never changes)."""
    out = [
        bank.teacher(images[k : k + batch_size])
        for k in tqdm(range(0, len(images), batch_size), desc="teacher", disable=not progress, leave=False)
    ]
    return torch.cat(out)


def train_experts(
    bank: ExpertBank,
    task: Task,
    schedule: NoiseSchedule,
    images: Tensor,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    labels: Tensor | None = None,
    identity: dict | None = None,
    accelerator=None,
    only: list[int] | None = None,
    progress: bool = True,
) -> dict:
    """Train every expert of ``bank`` (or those in ``only``) and save them under ``out_dir``.

    images [N, C, H, W] in [-1, 1]: the data-free corpus (distill) or real images (supervised,
    with ``labels``). Finished experts are skipped on re-runs; an interrupted expert resumes from
    its last checkpoint in ``out_dir/.resume``. Returns per-expert loss statistics.
    """
    dist = _Dist(accelerator, device=next(iter(bank.parameters())).device)  # without accelerate: where the bank is
    out_dir = Path(out_dir)
    router = bank.router
    if router.num_train_timesteps != schedule.num_train_timesteps:
        raise PPAPError(f"experts cover [0, {router.num_train_timesteps}) but the diffusion has T={schedule.num_train_timesteps}")
    if cfg.objective == "supervised" and labels is None:
        raise PPAPError("objective 'supervised' needs labelled images (e.g. --data fashion-mnist)")
    existed = out_dir.exists()
    created = False
    try:
        with contextlib.ExitStack() as held:

            def open_folder() -> dict:  # the main process: one writer per folder, a second `ppap train` on it is refused
                out_dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(exclusive_lock(out_dir / RUN_LOCK, blocking=False))
                return _open_manifest(out_dir, bank, task, schedule, cfg, identity)

            manifest = dist.decide(open_folder)
            bank.task = task
            bank.to(dist.device)
            images = images.to(dist.device)
            todo = [i for i in (only if only is not None else range(router.num_experts)) if expert_name(i) not in manifest["trained"]]
            targets = None  # the teacher's outputs, computed only if an expert is left to train
            if todo:
                if cfg.objective == "distill":
                    targets = teacher_outputs(bank, images, progress=progress and dist.main)
                else:
                    assert labels is not None  # checked above
                    targets = labels.to(dist.device)
                if targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
                    bad = int((~torch.isfinite(targets.flatten(1))).any(1).sum())
                    raise PPAPError(
                        f"the guidance model gives non-finite outputs on {bad} of {len(targets)} training images; nothing was trained"
                    )

            def write_manifest() -> bool:  # written only once the inputs passed every check
                if (out_dir / BANK_MANIFEST).exists():
                    return False
                atomic_write_json(out_dir / BANK_MANIFEST, manifest)
                return True

            created = dist.decide(write_manifest)
            return _train_all(bank, task, schedule, images, targets, cfg, out_dir, dist, manifest, todo, only, progress)
    except PPAPError:
        if dist.main and (not existed or (created and not manifest["trained"])):  # nothing learnt: leave the folder as found
            shutil.rmtree(out_dir / ".resume", ignore_errors=True)
            if created or not existed:
                (out_dir / BANK_MANIFEST).unlink(missing_ok=True)
            if not existed:
                (out_dir / RUN_LOCK).unlink(missing_ok=True)
                if out_dir.is_dir() and not any(out_dir.iterdir()):
                    out_dir.rmdir()
        raise


def _train_all(bank, task, schedule, images, targets, cfg, out_dir, dist, manifest, todo, only, progress) -> dict:
    stats = {}
    for i in only if only is not None else range(bank.router.num_experts):
        if i not in todo:
            bank.load_expert(i, out_dir)  # a later warm-started expert, and the caller, need it
            continue
        stats[expert_name(i)] = _train_one(bank, i, task, schedule, images, targets, cfg, out_dir, dist, progress)

        def record(i: int = i) -> None:
            atomic_write_json(out_dir / BANK_MANIFEST, record_expert(manifest, bank, i, out_dir, stats[expert_name(i)]))
            (out_dir / ".resume" / f"{expert_name(i)}.pt").unlink(missing_ok=True)

        dist.decide(record)
    return stats


def _open_manifest(out_dir: Path, bank, task, schedule, cfg, identity) -> dict:
    """The folder's manifest, or the one it will get (written by the caller after the checks)."""
    want = bank_manifest(bank, task, schedule, train=asdict(cfg))
    if identity:
        want["guide"] = want["guide"] | identity
    path = out_dir / BANK_MANIFEST
    if path.exists():
        have = read_json(path, "expert manifest")
        check_same_settings(
            _settings(have),
            _settings(want),
            f"{out_dir} holds experts trained with other settings",
            "use another --out or the same settings to resume",
            keys=("format", "boundaries", "adapter", "task", "guide_fingerprint", "schedule", "train"),
        )
        return have
    return want


def _settings(manifest: dict) -> dict:
    """What must match to resume: ``micro_batch`` says how a step is computed, not what it computes."""
    train = manifest.get("train")
    return manifest | {"train": {k: v for k, v in train.items() if k != "micro_batch"}} if isinstance(train, dict) else manifest


def class_balance_weights(targets: Tensor) -> Tensor:
    """[N] sampling weights that make every pseudo-label equally likely: 1 / (count of the sample's
    class), the class being the argmax of the teacher's logits (distill) or the label (supervised).
    A DDPM that draws few sandals gives their expert as many sandals as sneakers, without labels."""
    labels = targets.argmax(-1) if targets.is_floating_point() else targets
    if labels.ndim != 1:
        raise PPAPError("balance_classes needs a classification task (one class per image)")
    counts = torch.bincount(labels.cpu())
    return 1.0 / counts[labels.cpu()].double()


def _checkpoint(path: Path, bank, i: int, opt, step: int, losses: list[float]) -> None:
    atomic_torch_save(path, {"expert": bank.expert_state(i), "opt": opt.state_dict(), "step": step, "losses": losses})


def _train_one(bank, i, task, schedule, images, targets, cfg: TrainConfig, out_dir: Path, dist: _Dist, progress: bool) -> dict:
    lo, hi = bank.router.interval(i)
    resume = out_dir / ".resume" / f"{expert_name(i)}.pt"
    if cfg.warm_start and i > 0:
        bank.load_expert_state(i, bank.expert_state(i - 1))
    params = bank.trainable_parameters(i)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, losses = 0, []
    if resume.exists():
        state = load_resume_state(resume)
        bank.load_expert_state(i, state["expert"])
        opt.load_state_dict(state["opt"])
        step, losses = state["step"], state["losses"]
    # each expert has its own stream of batches, so skipping finished experts changes nothing
    batches = InfiniteBatches(
        images,
        targets,
        batch_size=cfg.batch_size,
        seed=cfg.seed * 1000 + i,
        weights=class_balance_weights(targets) if cfg.balance_classes else None,
    )
    per_rank = slice(dist.rank, None, dist.world)
    bank.train()
    bar = tqdm(
        total=cfg.iterations, initial=step, desc=f"{expert_name(i)} t∈[{lo},{hi})", disable=not (progress and dist.main), leave=False
    )
    t0 = time.time()
    while step < cfg.iterations:
        x0, target = (v[per_rank] for v in batches.batch(step))
        g = torch.Generator().manual_seed((cfg.seed * 1000 + i) * 1_000_003 + step)
        t_all = torch.randint(lo, hi, (cfg.batch_size,), generator=g)
        noise_all = torch.randn((cfg.batch_size,) + tuple(images.shape[1:]), generator=g)
        t, noise = t_all[per_rank].to(x0.device), noise_all[per_rank].to(x0.device)
        opt.zero_grad(set_to_none=True)
        n = x0.shape[0]
        chunk = cfg.micro_batch or n  # micro-batches: the activations of one at a time, the gradient of all
        loss = x0.new_zeros(())
        for a in range(0, n, chunk):
            part = slice(a, a + chunk)
            out = bank.run_expert(i, schedule.q_sample(x0[part], t[part], noise[part]))
            each = task.distill_loss(out, target[part]) if cfg.objective == "distill" else task.supervised_loss(out, target[part])
            (each.sum() / n).backward()
            loss = loss + each.detach().sum() / n
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        value = dist.mean(loss)  # the global batch's loss: every process sees a non-finite one and stops together
        if not math.isfinite(value):  # stop before the step: the last checkpoint stays finite
            raise PPAPError(
                f"{expert_name(i)} step {step}: the loss is {value} (learning rate {cfg.lr:g} too high, "
                f"or a non-finite guidance model); nothing of this expert was saved since its last checkpoint"
            )
        dist.mean_([p.grad for p in params if p.grad is not None])
        opt.step()
        step += 1
        losses.append(value)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.4f}")
        if step % cfg.checkpoint_every == 0 and step < cfg.iterations:
            dist.decide(functools.partial(_checkpoint, resume, bank, i, opt, step, losses))
    bar.close()
    dist.mean_(_norm_buffers(bank, i))  # running statistics were gathered on each rank's shard
    bank.eval()
    for p in params:
        p.requires_grad_(False)
    k = max(1, min(50, len(losses) // 4))
    return {
        "range": [lo, hi],
        "iterations": cfg.iterations,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "seconds": round(time.time() - t0, 2),
    }


def data_free_experts(
    pipe,
    diffusion_ref: str,
    guide,
    work_dir,
    *,
    corpus_size: int,
    cfg: TrainConfig,
    corpus_steps: int = 25,
    corpus_sampler: str = "ddim",
    task_name: str = "classification",
    corpus_dir=None,
    conditioning=None,
    prompts=None,
    progress: bool = True,
):
    """The whole data-free PPAP recipe: sample a corpus from the diffusion model (no labels; a
    conditional model with the given ``conditioning``, which ``prompts``, recorded in the corpus'
    manifest, say in words; ``corpus_steps`` steps of ``corpus_sampler``), then distill the off-the-shelf model
    (``guide``, whose net receives the adapters) into noise-range experts. Resumable at every
    stage. Returns (bank, stats); experts are saved in ``work_dir/experts``, the corpus in
    ``corpus_dir`` (default ``work_dir/corpus``)."""
    from .banks import make_bank
    from .batch_sampling import generate_corpus
    from .corpus import corpus_spec, load_corpus, open_corpus
    from .router import TimestepRouter
    from .tasks import task_for

    work_dir = Path(work_dir)
    schedule = pipe.diffusion.schedule
    spec = corpus_spec(
        pipe,
        diffusion_ref,
        corpus_size,
        steps=corpus_steps,
        sampler=corpus_sampler,
        seed=cfg.seed,
        conditioning=conditioning,
        prompts=prompts,
    )
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else work_dir / "corpus"
    open_corpus(corpus_dir, spec)
    generate_corpus(pipe, corpus_dir, spec, conditioning=conditioning, progress=progress)
    images = load_corpus(corpus_dir)
    task = task_for(guide, pipe.image_shape, task_name, tau=cfg.tau)
    router = TimestepRouter.parse(cfg.experts, schedule.num_train_timesteps, schedule.alphas_cumprod)
    bank = make_bank(guide, router, cfg.adapter_config(), seed=cfg.seed)
    stats = train_experts(bank, task, schedule, images, cfg, work_dir / "experts", progress=progress)
    return bank, stats
