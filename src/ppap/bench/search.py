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
rows added later (``methods``, ``gradient_rows``, ``scales``, ``budgets``) are computed beside the
cached ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..batch_sampling import sample_generators, sample_images
from ..diffusion import Prediction
from ..io import PPAPError, atomic_write_bytes, atomic_write_json
from ..loading import load_experts, load_guide
from ..metrics import features, fid, precision_recall
from ..particles import particle_noise, sample_particles
from ..tasks import Classification
from .common import Bench, _savefig, in_order, machine, machine_in_order, pyplot, round_robin_median

PARTICLE_ROWS = ("best-of-n", "fk", "tds", "ppap-smc", "ppap-fk")
GRADIENT_ROWS = ("naive", "ppap", "noise-aware", "x0")


@dataclass(frozen=True)
class SearchBenchConfig:
    diffusion: str = "fashion-ddpm"
    guide: str = "fashion-classifier"
    experts: str = "fashion-ppap5"
    noise_aware: str = (
        "runs/bench-classifier/banks/noise-aware"  # a supervised bank (`ppap bench classifier` trains it); row left out if absent
    )
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


QUICK = SearchBenchConfig(
    num=4,
    steps=3,
    budgets=(1, 2),
    scales=(1.0,),
    gradient_rows=("naive", "ppap"),
    batch_size=4,
    cost_batch=2,
    cost_repeats=1,
    real_images=200,
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
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
                raise PPAPError(f"scales: lambda must be a finite number > 0, got {lam!r} for {method}")


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
    ROW_FIELDS = ("methods", "gradient_rows", "scales", "budgets")  # each (method, K, lambda) row is its own stage

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
        pred = self.evaluator_classes(x)
        hit = (pred == self.targets).float()
        per_class = [float(hit[self.targets == c].mean()) for c in range(self.task.num_classes) if bool((self.targets == c).any())]
        feats = features(self.evaluator, x)
        prec, rec = precision_recall(self.real_features[: len(x)], feats) if len(x) > 3 else (float("nan"), float("nan"))
        return {
            "n": len(x),
            "accuracy": float(hit.mean()),
            "per_class_min": min(per_class),
            "fid": fid(feats, self.real_features) if len(x) > 1 else float("nan"),
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
                bank = load_experts(self.cfg.noise_aware, copy.deepcopy(self.guide), self.diffusion)
            term = self.pipe.guidance_term(self.cfg.num, guide=self.guide, experts=bank, target=self.targets, method=method)
        x, seconds = self.sample(self.cfg.num, term, self.cfg.seed, desc=method)
        return self.score(x, seconds) | {"scale": None if term is None else term.scale}

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
        rows = ("unguided", "unguided-ddpm") + tuple(self.cfg.gradient_rows)
        for m in rows:
            if m != "noise-aware" or Path(self.cfg.noise_aware).is_dir():
                jobs[m] = ("gradient_row", (m,))
        return jobs

    def _run(self) -> dict:
        t0 = time.time()
        cost = self.timed("cost", self.cost_stage)
        jobs = self.row_jobs(cost)
        rows = self.timed("rows", lambda: self.jobs("rows", jobs), cached=all(map(self.stage.exists, jobs)), save=False)
        for name, row in rows.items():
            method = row["method"] if "particles" in row else name
            if "particles" in row:
                row["compute"] = round(row["particles"] * particle_cost(method, self.cfg.steps, cost["guide"], cost["expert"]), 2)
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
            "stage_seconds": self.timings,
            "seconds_this_call": round(time.time() - t0, 1),
        }
        atomic_write_json(self.out / "results.json", results)
        atomic_write_bytes(self.out / "report.md", search_report(results).encode())
        figure(results, self.out / "bench_search.png")
        return results


def figure(r: dict, path: Path) -> None:
    """Accuracy and FID against compute per returned sample; ESS / K and the twists' accuracy over t."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    rows = r["rows"]
    curves = sorted({(row["method"], row["scale"]) for row in rows.values() if "particles" in row})
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
    for ax, label in zip(axes[:2], ("judge accuracy", "FID (judge features)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compute per returned sample (x unguided DDIM run)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    for row in rows.values():
        if "particles" in row and row["method"] in ("tds", "ppap-smc", "fk", "ppap-fk"):
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
    stage_seconds = in_order(r["stage_seconds"], ("cost", "rows"))
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in stage_seconds.items())]
    return "\n".join(lines) + "\n"


def run_search_bench(out: Path, quick: bool = False, cfg: SearchBenchConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or (QUICK if quick else SearchBenchConfig())
    return SearchBench(cfg, out, progress=progress).run()


__all__ = ["QUICK", "SearchBenchConfig", "run_search_bench", "search_report", "particle_cost", "gradient_cost"]
