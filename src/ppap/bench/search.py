"""``ppap bench search``: the particle methods against the gradient methods at matched compute.

Rows: best-of-n, FK, TDS, ppap-smc and ppap-fk (``ppap.particles``) at budgets of 1, 2, 4, 8 and 16x the
compute of one unguided DDIM-S run (each at every lambda of ``scales``, or of its own entry there; best-of-n at the first
only, since lambda does not change which particle it keeps), and the gradient rows (naive, PPAP, noise-aware, x0) at
their own single-run cost, with the unguided model on both chains (DDIM eta 0, and the DDPM
chain the particle methods run). Compute is counted per *returned* sample, in UNet forwards: a
UNet forward = 1, a backward = 2 forwards, the guide's and the experts' forward measured here (a
ratio to the UNet's per sample); one unguided DDIM-S run = S. A particle run returns one sample
for its K particles (which share ancestors after resampling, so they are not K samples).

Scored by the judge (``fashion-evaluator``, never a guide): accuracy toward the target, the
worst class, FID / precision / recall against the real test set. From the same particle runs:
the effective sample size over t (TDS, ppap-smc, FK, ppap-fk) and the twist's accuracy per noise level,
the experts' and the clean classifier-on-x0_hat's class at x_t against the judge's class of the
particle's final x_0 (followed along resampling). Every row is a stage file: a re-run resumes, and
rows added later (``methods``, ``gradient_rows``, ``scales``, ``budgets``, ``exact_pool``,
``exact_scales``) are computed beside the cached ones.

The ``exact`` rows say what a sampler of the target itself would score: p(x) p(y | x)^lambda, with
p(x) the DDPM-S chain the particle methods run, by importance resampling of one pool of unguided
samples (``importance_resample``). Their weights, p(y | x_0)^lambda, are at most 1, so with a pool
far larger than a class's draws the rows are near exact; the effective sample size per class is
reported beside them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from ..banks import ExpertBank
from ..batch_sampling import sample_generators, sample_images
from ..diffusion import Prediction
from ..fashion_mnist import load_fashion_mnist
from ..io import PPAPError, atomic_write_bytes, atomic_write_json
from ..loading import load_experts, load_guide
from ..metrics import features, fid, precision_recall
from ..particles import particle_noise, sample_particles
from ..tasks import Classification
from .classifier_tables import bank_specs
from .common import (
    Bench,
    _savefig,
    bank_train_seconds,
    choose_scale,
    in_order,
    machine,
    machine_in_order,
    pyplot,
    round_robin_median,
    train_or_load_bank,
)

PARTICLE_ROWS = ("best-of-n", "fk", "tds", "ppap-smc", "ppap-fk")
GRADIENT_ROWS = ("naive", "ppap", "noise-aware", "x0")


@dataclass(frozen=True)
class SearchBenchConfig:
    diffusion: str = "fashion-ddpm"
    guide: str = "fashion-classifier"
    experts: str = "fashion-ppap5"
    # the noise-aware row's bank: a trained bank's folder, or None: the classifier bench's labelled
    # noise-aware recipe (one full copy, 5 x expert_iterations steps) trained in this folder, banks/noise-aware
    noise_aware: str | None = None
    expert_iterations: int = 800
    labelled_images: int | None = None  # real training images (and labels) it learns from (None: all 60,000)
    evaluator: str = "fashion-evaluator"
    num: int = 1000  # returned samples per row, the classes in turn
    steps: int = 25  # S: every chain's steps
    # lambdas of the particle methods (p(y|x)^lambda; 1: the exact conditional): one tuple for every
    # method, or {method: lambdas} (a method left out runs at none)
    scales: tuple | dict = (1.0, 3.0)
    budgets: tuple = (1, 2, 4, 8, 16)  # x the compute of one unguided DDIM-S run
    methods: tuple = PARTICLE_ROWS
    gradient_rows: tuple = GRADIENT_ROWS
    batch_size: int = 50  # images per call (x K particles)
    seed: int = 6000
    cost_batch: int = 32
    cost_repeats: int = 5
    real_images: int | None = None  # real test images for FID / precision / recall (None: all)
    # the exact rows: one pool of unguided DDPM-S samples (0: none), resampled at each lambda
    exact_pool: int = 10_000
    exact_scales: tuple = (1.0, 3.0)


QUICK = SearchBenchConfig(
    num=4,
    steps=3,
    budgets=(1, 2),
    scales=(1.0,),
    gradient_rows=("naive", "ppap", "noise-aware"),
    expert_iterations=2,
    labelled_images=256,
    batch_size=4,
    cost_batch=2,
    cost_repeats=1,
    real_images=200,
    exact_pool=12,
    exact_scales=(1.0,),
)


def check_config(cfg: SearchBenchConfig) -> None:
    """A one-line PPAPError for a row the bench does not know, or a lambda that is not a finite
    number > 0."""
    for field_name, known in (("methods", PARTICLE_ROWS), ("gradient_rows", GRADIENT_ROWS)):
        for name in getattr(cfg, field_name):
            if name not in known:
                raise PPAPError(f"{field_name}: unknown row {name!r}; valid: {', '.join(known)}")
    per_method = cfg.scales if isinstance(cfg.scales, dict) else {m: cfg.scales for m in cfg.methods}
    for method, lambdas in per_method.items():
        if method not in PARTICLE_ROWS:
            raise PPAPError(f"scales: unknown particle method {method!r}; valid: {', '.join(PARTICLE_ROWS)}")
        for lam in lambdas:
            if not _is_lambda(lam):
                raise PPAPError(f"scales: lambda must be a finite number > 0, got {lam!r} for {method}")
    for lam in cfg.exact_scales:
        if not _is_lambda(lam):
            raise PPAPError(f"exact_scales: lambda must be a finite number > 0, got {lam!r}")
    if isinstance(cfg.exact_pool, bool) or not isinstance(cfg.exact_pool, int) or not (cfg.exact_pool == 0 or cfg.exact_pool >= cfg.num):
        raise PPAPError(f"exact_pool: must be 0 (no exact rows) or a whole number >= num ({cfg.num}), got {cfg.exact_pool!r}")


def _is_lambda(lam: object) -> bool:
    return not isinstance(lam, bool) and isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0


def importance_resample(log_prob: Tensor, targets: Tensor, scale: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draws from a pool of samples of p(x) toward p(x) p(y | x)^``scale``: ``log_prob`` [P, C] is
    log p(y | x_i) of every pool sample and class, ``targets`` [N] the class of each draw. Each
    class's draws are taken without replacement, with probabilities proportional to
    p(y | x_i)^scale (Gumbel top-k), so no pool sample repeats within a class. Returns the pool
    indices [N] and each class's effective sample size [C], (sum w)^2 / sum w^2: the draws are near
    exact where it is far above the class's number of draws."""
    log_w = scale * log_prob.double()
    picks = torch.empty(len(targets), dtype=torch.long)
    ess = torch.zeros(log_prob.shape[1], dtype=torch.float64)
    for c in range(log_prob.shape[1]):
        w = log_w[:, c].softmax(0)
        ess[c] = 1 / w.square().sum()
        mine = (targets == c).nonzero().squeeze(1)
        gumbel = -torch.empty(len(w), dtype=torch.float64).exponential_(generator=generator).log()
        picks[mine] = (log_w[:, c] + gumbel).topk(len(mine)).indices
    return picks, ess


def particle_cost(method: str, steps: int, guide: float, expert: float) -> float:
    """Compute of ONE particle of ``method`` in unguided DDIM runs (S UNet forwards); ``guide`` and
    ``expert``: their forward's cost per sample as a fraction of a UNet forward's."""
    s = steps
    units = {
        "best-of-n": s + guide,  # the chain, and the classifier on x_0
        "fk": s + (s + 1) * guide,  # the classifier on x0_hat at every step, and on x_0
        "tds": 3 * s + 3 * s * guide + guide,  # UNet and classifier forward + backward at every step
        "ppap-smc": s + 3 * s * expert + guide,  # the expert's forward + backward; no UNet backward
        "ppap-fk": s + s * expert + guide,  # the expert's forward at every step; no backward at all
    }[method]
    return units / s


def gradient_cost(method: str, steps: int, guide: float, expert: float) -> float:
    """Compute of one DDIM-S run guided by ``method``, in unguided runs."""
    s = steps
    units = {
        "unguided": s,
        "naive": s + 3 * s * guide,
        "ppap": s + 3 * s * expert,
        "noise-aware": s + 3 * s * guide,  # one full copy of the guide
        "x0": 3 * s + 3 * s * guide,
    }[method]
    return units / s


def particles_at(method: str, budget: float, cost: dict, steps: int) -> int:
    """K for ``method`` at ``budget``: the nearest whole number of particles (0: out of reach)."""
    return int(budget / particle_cost(method, steps, cost["guide"], cost["expert"]) + 0.5)


class SearchBench(Bench):
    # each (method, K, lambda) row is its own stage, and the exact rows' pool its own file
    ROW_FIELDS = ("methods", "gradient_rows", "scales", "budgets", "exact_pool", "exact_scales")

    def __init__(self, cfg: SearchBenchConfig, out: Path, progress: bool = True):
        super().__init__(cfg, out, progress)
        self.guide = load_guide(cfg.guide)
        self.bank = load_experts(cfg.experts, copy.deepcopy(self.guide), self.diffusion).eval()
        assert isinstance(self.bank.task, Classification)
        self.task = self.bank.task
        self.targets = torch.arange(cfg.num) % self.task.num_classes
        self.grid = self.diffusion.schedule.grid(cfg.steps, "ddpm")

    # ---- cost ------------------------------------------------------------------------------

    def cost_stage(self) -> dict:
        """Seconds per sample of a UNet forward, the guide's and the routed expert's (mid-noise
        t), at ``cost_batch``; the guide's and expert's as fractions of the UNet's."""
        x = torch.randn((self.cfg.cost_batch,) + self.diffusion.image_shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((len(x),), int(self.grid.timesteps[len(self.grid) // 2]))
        with torch.no_grad():
            seconds = round_robin_median(
                {"unet": lambda: self.diffusion(x, t), "guide": lambda: self.guide(x), "expert": lambda: self.bank(x, t)},
                self.cfg.cost_repeats,
            )
        return {"unet_seconds_per_sample": seconds["unet"] / len(x)} | {
            k: round(seconds[k] / seconds["unet"], 4) for k in ("guide", "expert")
        }

    # ---- rows ------------------------------------------------------------------------------

    def score(self, x: Tensor, seconds: float) -> dict:
        return self.score_judged(self.evaluator_classes(x), features(self.evaluator, x), seconds)

    def score_judged(self, pred: Tensor, feats: Tensor, seconds: float) -> dict:
        """The row's scores from the judge's class [N] and features [N, D] of its samples."""
        hit = (pred == self.targets).float()
        per_class = [float(hit[self.targets == c].mean()) for c in range(self.task.num_classes) if bool((self.targets == c).any())]
        n = len(pred)
        prec, rec = precision_recall(self.real_features[:n], feats) if n > 3 else (float("nan"), float("nan"))
        return {
            "n": n,
            "accuracy": float(hit.mean()),
            "per_class": per_class,  # [C]: accuracy per class asked for
            "per_class_min": min(per_class),
            "fid": fid(feats, self.real_features) if n > 1 else float("nan"),
            "precision": prec,
            "recall": rec,
            "seconds": round(seconds, 1),
        }

    def gradient_row(self, method: str) -> dict:
        """``method``'s DDIM-S samples (eta 0) at its default scale; ``unguided-ddpm``: the
        particle methods' chain, unguided."""
        t0 = time.time()
        if method == "unguided-ddpm":
            x = sample_images(
                self.pipe, self.cfg.num, seed=self.cfg.seed, batch_size=self.cfg.batch_size, progress=False,
                num_inference_steps=self.cfg.steps, sampler="ddpm",
            )  # fmt: skip
            return self.score(x, time.time() - t0) | {"scale": None}
        term = None
        if method != "unguided":
            bank = self.bank if method == "ppap" else None
            if method == "noise-aware":
                bank = self.noise_aware()
            term = self.pipe.guidance_term(self.cfg.num, guide=self.guide, experts=bank, target=self.targets, method=method)
        x, seconds = self.sample(self.cfg.num, term, self.cfg.seed, desc=method)
        out = self.score(x, seconds) | {"scale": None if term is None else term.scale}
        if method == "noise-aware" and self.cfg.noise_aware is None:
            out["train_seconds"] = bank_train_seconds(self.out / "banks" / "noise-aware")
        return out

    def noise_aware(self) -> ExpertBank:
        """The labelled noise-aware classifier: the bank at ``noise_aware``, or the classifier
        bench's noise-aware bank trained (or resumed, or loaded) in this folder."""
        if self.cfg.noise_aware is not None:
            return load_experts(self.cfg.noise_aware, copy.deepcopy(self.guide), self.diffusion)
        n = self.cfg.labelled_images
        spec = bank_specs(self.cfg.expert_iterations)["noise-aware"]

        def data() -> tuple[Tensor, Tensor]:  # read only when something is left to train
            images, labels = load_fashion_mnist("train")
            return images[:n], labels[:n]

        return train_or_load_bank(
            load_guide(self.cfg.guide), self.diffusion, spec.train, self.out / "banks" / "noise-aware", data, self.progress
        )

    def probe(self, x_t: Tensor, t: Tensor, pred: Prediction) -> dict[str, Tensor]:
        """The class each twist sees at x_t: the routed expert's, the clean classifier's on x0_hat."""
        with torch.no_grad():
            return {"experts": self.bank(x_t, t).argmax(-1), "classifier-on-x0": self.guide(pred.x0.clamp(-1, 1)).argmax(-1)}

    def particle_row(self, method: str, k: int, scale: float) -> dict:
        """``method`` with K = ``k`` particles per returned sample at lambda = ``scale``, the runs' ESS over t and (TDS,
        ppap-smc, ppap-fk) the twists' accuracy per step against the judge's class of each final particle."""
        cfg, t0 = self.cfg, time.time()
        xs, ess, resampled, total = [], [], [], 0
        right: dict[str, Tensor] = {}
        for b0 in range(0, cfg.num, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num - b0)
            gens = sample_generators(cfg.seed, b0, n)
            x_T = particle_noise(n, k, self.diffusion.image_shape, gens, "cpu")
            run = sample_particles(
                method, self.diffusion, x_T, self.grid, particles=k, net=self.guide, task=self.task,
                target=self.targets[b0 : b0 + n], scale=scale, bank=self.bank, generator=gens,
                probe=self.probe if method in ("tds", "ppap-smc", "ppap-fk") else None,
            )  # fmt: skip
            xs.append(run.images.clamp(-1, 1))
            ess.append(run.ess / k)
            resampled.append(run.resampled.double())
            if run.probes:
                final = self.evaluator_classes(run.particles.clamp(-1, 1))
                for name, classes in run.probes.items():
                    right[name] = right.get(name, 0) + (classes == final).double().sum(1)
                total += len(final)
        out = self.score(torch.cat(xs), time.time() - t0)
        return out | {
            "particles": k,
            "scale": scale,
            "method": method,
            "timesteps": run.timesteps,
            "ess_over_k": torch.cat(ess, 1).mean(1).tolist(),  # [S]
            "resampled": torch.cat(resampled, 1).mean(1).tolist(),  # [S] fraction of runs resampling at each step
            "twist_accuracy": {name: (r / total).tolist() for name, r in right.items()},
        }

    def exact_pool(self) -> dict[str, Tensor]:
        """``exact_pool`` unguided DDPM-S samples (seeded apart from the rows' noises), kept as the
        guide's log p(y | x_0) of every class [P, C], the judge's class [P] and features [P, D]."""
        name = f"exact-pool{self.cfg.exact_pool}"
        path = self.stage.dir / f"{name}.safetensors"
        return self.timed(name, lambda: load_file(path) if path.exists() else self._draw_pool(path), cached=path.exists(), save=False)

    def _draw_pool(self, path: Path) -> dict[str, Tensor]:
        x = sample_images(
            self.pipe, self.cfg.exact_pool, seed=self.cfg.seed + 1, batch_size=self.cfg.batch_size, progress=self.progress,
            desc="exact pool", num_inference_steps=self.cfg.steps, sampler="ddpm",
        )  # fmt: skip
        with torch.no_grad():
            logits = torch.cat([self.guide(x[i : i + 500]) for i in range(0, len(x), 500)])
        pool = {"log_prob": logits.log_softmax(-1), "judge": self.evaluator_classes(x), "features": features(self.evaluator, x)}
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in pool.items()}))
        return pool

    def exact_row(self, scale: float) -> dict:
        """p(x) p(y | x)^``scale`` by importance resampling of the pool (``importance_resample``):
        the judge's scores of the draws, the accuracy the weights give over the whole pool, and
        each class's effective sample size."""
        pool = self.exact_pool()
        t0 = time.time()
        picks, ess = importance_resample(pool["log_prob"], self.targets, scale, torch.Generator().manual_seed(self.cfg.seed))
        w = (scale * pool["log_prob"].double()).softmax(0)  # [P, C]: each class's weights over the pool
        hit = pool["judge"][:, None] == torch.arange(w.shape[1])
        return self.score_judged(pool["judge"][picks], pool["features"][picks], time.time() - t0) | {
            "method": "exact",
            "pool": self.cfg.exact_pool,
            "scale": scale,
            "weighted_accuracy": (w * hit).sum(0).tolist(),  # [C]: the target's accuracy per class, without draw noise
            "ess": ess.tolist(),  # [C]
        }

    def row_jobs(self, cost: dict) -> dict[str, tuple[str, tuple]]:
        jobs: dict[str, tuple[str, tuple]] = {}
        for method in self.cfg.methods:
            for budget in self.cfg.budgets:
                k = particles_at(method, budget, cost, self.cfg.steps)
                scales = tuple(self.cfg.scales.get(method, ())) if isinstance(self.cfg.scales, dict) else self.cfg.scales
                # best-of-N keeps the particle the classifier scores highest: lambda does not change it
                scales = scales[:1] if method == "best-of-n" else scales
                for scale in scales if k >= 1 else ():
                    jobs[f"{method}-K{k}-lambda{scale:g}"] = ("particle_row", (method, k, scale))
        for scale in self.cfg.exact_scales if self.cfg.exact_pool else ():
            jobs[f"exact-pool{self.cfg.exact_pool}-lambda{scale:g}"] = ("exact_row", (scale,))
        rows = ("unguided", "unguided-ddpm") + tuple(self.cfg.gradient_rows)
        for m in rows:
            jobs[m] = ("gradient_row", (m,))
        return jobs

    def _run(self) -> dict:
        t0 = time.time()
        cost = self.timed("cost", self.cost_stage)
        jobs = self.row_jobs(cost)
        rows = self.timed("rows", lambda: self.jobs("rows", jobs), cached=all(map(self.stage.exists, jobs)), save=False)
        for name, row in rows.items():
            method = row["method"] if "particles" in row or "pool" in row else name
            if "particles" in row:
                row["compute"] = round(row["particles"] * particle_cost(method, self.cfg.steps, cost["guide"], cost["expert"]), 2)
            elif "pool" in row:  # the pool, and the guide on each of its samples, shared by every returned sample
                row["compute"] = round(row["pool"] / self.cfg.num * particle_cost("best-of-n", self.cfg.steps, cost["guide"], 0.0), 2)
            else:
                row["compute"] = round(
                    gradient_cost(method.replace("unguided-ddpm", "unguided"), self.cfg.steps, cost["guide"], cost["expert"]), 2
                )
            row["method"] = method
        results = {
            "config": dataclasses.asdict(self.cfg),
            "machine": machine(),
            "cost": cost,
            "rows": rows,
            "chosen_lambda": chosen_lambdas(rows),
            "stage_seconds": self.timings,
            "seconds_this_call": round(time.time() - t0, 1),
        }
        atomic_write_json(self.out / "results.json", results)
        atomic_write_bytes(self.out / "report.md", search_report(results).encode())
        figure(results, self.out / "bench_search.png")
        return results


def chosen_lambdas(rows: dict) -> dict[str, float]:
    """``{"METHOD-KK": lambda}`` for each particle method and K run at more than one lambda: the
    lambda the gradient benches' rule picks (``choose_scale``: the highest accuracy, then the
    lowest FID among points within 2 points of it)."""
    runs: dict[str, list[dict]] = {}
    for row in rows.values():
        if "particles" in row:
            runs.setdefault(f"{row['method']}-K{row['particles']}", []).append(row)
    return {key: choose_scale(points)["scale"] for key, points in runs.items() if len(points) > 1}


def figure(r: dict, path: Path) -> None:
    """Accuracy and FID against compute per returned sample; ESS / K and the twists' accuracy over t."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    rows = r["rows"]
    shown = [row for row in rows.values() if "particles" in row]
    curves = sorted({(row["method"], row["scale"]) for row in shown})
    for method, scale in curves:  # one line per particle method and lambda, over the budgets
        mine = sorted(
            (row for row in rows.values() if "particles" in row and (row["method"], row["scale"]) == (method, scale)),
            key=lambda row: row["compute"],
        )
        for ax, key in zip(axes[:2], ("accuracy", "fid")):
            ax.plot([m["compute"] for m in mine], [m[key] for m in mine], "o-", label=f"{method} lambda {scale:g}")
    for name, row in rows.items():
        if "particles" not in row:
            for ax, key in zip(axes[:2], ("accuracy", "fid")):
                ax.scatter([row["compute"]], [row[key]], marker="s")
                ax.annotate(name, (row["compute"], row[key]), fontsize=6)
    particle_fids = [row["fid"] for row in shown if math.isfinite(row["fid"])]
    if particle_fids:  # a gradient row far off (naive) would flatten the particle curves
        axes[1].set_ylim(0, 3 * max(particle_fids))
    for ax, label in zip(axes[:2], ("judge accuracy", "FID (judge features)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compute per returned sample (x unguided DDIM run)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    # the diagnostics of one budget only, the one nearest 4x (every method reaches it), to stay readable
    near = min((abs(math.log(row["compute"] / 4)) for row in shown), default=0.0)
    for row in (row for row in shown if abs(math.log(row["compute"] / 4)) <= near + 0.3):
        if row["method"] in ("tds", "ppap-smc", "fk", "ppap-fk"):
            axes[2].plot(row["timesteps"], row["ess_over_k"], label=f"{row['method']} K={row['particles']} lambda {row['scale']:g}")
        for twist, acc in row.get("twist_accuracy", {}).items():
            axes[3].plot(row["timesteps"], acc, label=f"{twist} ({row['method']} K={row['particles']} lambda {row['scale']:g})")
    for ax, label in zip(axes[2:], ("ESS / K before resampling", "twist's class = judge's class of the final x_0")):
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.invert_xaxis()
        if ax.lines:
            ax.legend(fontsize=6)
    _savefig(fig, path)


def search_report(r: dict) -> str:
    cfg, cost = r["config"], r["cost"]
    s = cfg["steps"]
    lines = [
        f"Machine: {machine_in_order(r)}. {cfg['num']} returned samples per row (classes in turn), judged by "
        f"{cfg['evaluator']}; particle methods on the DDPM-{s} chain (lambda in the row's name), gradient rows on DDIM-{s} (eta 0) at their default scales.",
        f"Compute per returned sample in unguided DDIM-{s} runs: UNet forward 1, backward 2, guide forward {cost['guide']:.3f} "
        f"and expert forward {cost['expert']:.3f} of a UNet forward (measured, batch {cfg['cost_batch']}). A particle run's K "
        "particles give one sample (they share ancestors after resampling).",
        "",
        "| row | K | compute (x unguided) | accuracy | worst class | FID | precision | recall | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(r["rows"].items(), key=lambda kv: ("particles" in kv[1], kv[1]["method"], kv[1]["compute"]))
    for name, row in order:
        lines.append(
            f"| {name} | {row.get('particles', '')} | {row['compute']:.2f} | {row['accuracy']:.1%} | {row['per_class_min']:.1%} | "
            f"{row['fid']:.2f} | {row['precision']:.2f} | {row['recall']:.2f} | {row['seconds']} |"
        )
    lines += ["", "ESS / K (mean over runs) and the twists' accuracy at a few steps:", ""]
    for name, row in order:
        if "ess_over_k" not in row:
            continue
        picks = sorted({0, len(row["timesteps"]) // 2, len(row["timesteps"]) - 1})
        at = ", ".join(f"t={row['timesteps'][i]}: {row['ess_over_k'][i]:.2f}" for i in picks)
        twist = "; ".join(
            f"{k} " + ", ".join(f"t={row['timesteps'][i]}: {v[i]:.0%}" for i in picks) for k, v in row.get("twist_accuracy", {}).items()
        )
        lines.append(f"- {name}: ESS/K {at}" + (f"; twist accuracy: {twist}" if twist else ""))
    if r.get("chosen_lambda"):
        lines += [
            "",
            "Lambda chosen per method and K (the highest accuracy, then the lowest FID within 2 points): "
            + ", ".join(f"{key} {lam:g}" for key, lam in r["chosen_lambda"].items()),
        ]
    exact = [(name, row) for name, row in order if "pool" in row]
    if exact:
        lines += [
            "",
            "Exact rows: the target's accuracy over the whole pool (its weights), and the smallest effective sample size of a class:",
            "",
        ]
    for name, row in exact:
        lines.append(
            f"- {name}: weighted accuracy {sum(row['weighted_accuracy']) / len(row['weighted_accuracy']):.1%} "
            f"(worst class {min(row['weighted_accuracy']):.1%}); ESS min {min(row['ess']):.0f} of a pool of {row['pool']}"
        )
    stage_seconds = in_order(r["stage_seconds"], ("cost", "rows"))
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in stage_seconds.items())]
    return "\n".join(lines) + "\n"


def run_search_bench(out: Path, quick: bool = False, cfg: SearchBenchConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or (QUICK if quick else SearchBenchConfig())
    return SearchBench(cfg, out, progress=progress).run()


__all__ = ["QUICK", "SearchBenchConfig", "importance_resample", "run_search_bench", "search_report", "particle_cost", "gradient_cost"]
