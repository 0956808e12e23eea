"""What every bench shares: stage files and the configuration check, the models and real test set
the zoo benches load, the timed stage runner, the job runner (a pool of worker processes), a
measurement in a fresh process, guided sampling, step timing and step memory, the results files,
the machine description, report order and figure saving."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import json
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..bank_format import BANK_MANIFEST, load_manifest
from ..banks import ExpertBank, load_bank, make_bank
from ..batch_sampling import sample_images
from ..diffusion import Conditioning, Diffusion, SamplingGrid
from ..fashion_mnist import load_fashion_mnist
from ..guidance import Calibration, Guidance, GuidanceTerm
from ..guide_model import GuideModel
from ..io import PPAPError, atomic_write_bytes, atomic_write_json, check_same_settings, read_json
from ..loading import load_experts, load_guide, load_pipeline
from ..metrics import features, fid, kid, precision_recall, predict
from ..router import TimestepRouter
from ..samplers import sample_ddim
from ..tasks import task_for
from ..train import TrainConfig, train_experts


class _Stage:
    """A JSON result per stage under ``out/stages``: computed once, then read back."""

    def __init__(self, out: Path):
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        path = self.path(name)
        if path.exists():
            return read_json(path, f"bench stage {name}")
        value = compute()
        atomic_write_json(path, value)
        return value

    NOT_CONFIGURATION = ("workers", "device", "ablations", "extra_rows")

    def check_config(self, config: dict, ignore: tuple[str, ...] = NOT_CONFIGURATION) -> None:
        """A results folder belongs to one configuration: refuse to mix the stages of two. How
        it runs (``workers``, ``device``) and which cached rows it adds (``ablations``,
        ``extra_rows``) are not configuration."""
        path = self.dir / "config.json"
        if not path.exists():
            atomic_write_json(path, config)
            return
        check_same_settings(
            read_json(path, "bench configuration"),
            config,
            f"{self.dir.parent} holds stages of another bench configuration",
            "use another --out, or delete that folder to start over",
            ignore=ignore,
        )


class Bench:
    """What every bench builds alike from its configuration (which has at least ``diffusion``,
    ``evaluator``, ``steps`` and ``batch_size``; ``workers`` when its jobs may run in parallel):
    the results folder and its stages, the pipeline, the evaluator, the real test set and its
    evaluator features. A subclass writes ``_run`` (its stages, then results and report)."""

    ROW_FIELDS: tuple[str, ...] = ()  # configuration fields that only pick which cached rows run (each row its own stage)

    def __init__(self, cfg: Any, out: Path, progress: bool = True):
        self._open(cfg, out, progress)
        self.pipe = load_pipeline(cfg.diffusion, device="cpu")
        self.diffusion: Diffusion = self.pipe.diffusion
        self.evaluator = load_guide(cfg.evaluator).net
        self.x_test, self.y_test = load_fashion_mnist("test")
        real = getattr(cfg, "real_images", None)  # a bench may compare against the first N test images only (its quick version)
        self.real_features = features(self.evaluator, self.x_test[:real])

    def _open(self, cfg: Any, out: Path, progress: bool) -> None:
        """The results folder of ``cfg`` (its stages, checked against the configuration) and the
        stage bookkeeping: what every bench needs, models or not."""
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.stage = _Stage(self.out)
        self.stage.check_config(dataclasses.asdict(cfg), ignore=_Stage.NOT_CONFIGURATION + self.ROW_FIELDS)
        self.timings: dict[str, float] = {}
        self._recorded: dict[str, float] = {}  # stages/seconds.json: every stage's seconds when it was computed
        self._pool: ProcessPoolExecutor | None = None

    @property
    def workers(self) -> int:
        return getattr(self.cfg, "workers", 1)

    # ---- running ---------------------------------------------------------------------------

    def run(self) -> dict:
        seconds_file = self.stage.dir / "seconds.json"
        self._recorded = read_json(seconds_file, "bench stage times") if seconds_file.exists() else {}
        self.timings = {}  # this call's stages in the order they ran, each with its recorded seconds
        try:
            return self._run()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _run(self) -> dict:
        raise NotImplementedError

    def timed(self, name: str, compute: Callable[[], Any], cached: bool | None = None, save: bool = True, partly: bool = False) -> Any:
        """Stage ``name``: its value (``save``: kept in, or read back from, its stage file) and its
        seconds in ``stages/seconds.json``. A stage read back keeps the time recorded when it was
        computed; ``cached`` says whether it is read back, where that is not its own file alone;
        ``partly``: some of its jobs are read back, so this call's time adds to the recorded one
        (a row added to a finished table)."""
        cached = self.stage.exists(name) if cached is None else cached
        t = time.time()
        value = self.stage.get(name, compute) if save else compute()
        if cached and name in self._recorded:
            self.timings[name] = self._recorded[name]
        else:
            before = self._recorded.get(name, 0.0) if partly else 0.0
            self.timings[name] = self._recorded[name] = round(before + time.time() - t, 1)
            atomic_write_json(self.stage.dir / "seconds.json", self._recorded)
        return value

    def timed_parts(self, name: str, compute: Callable[[], Any], parts: list[str]) -> Any:
        """``timed`` for stage ``name`` made of the stage files ``parts`` (a file per job): read
        back when every part is; when some are, this call's time adds to the recorded one."""
        done = [self.stage.exists(part) for part in parts]
        return self.timed(name, compute, cached=all(done), save=False, partly=any(done))

    def jobs(self, desc: str, jobs: dict[str, tuple[str, tuple]], cache: bool = True) -> dict:
        """Run ``{stage name: (method, args)}`` (``getattr(self, method)(*args)``), each result
        saved as its own stage file (``cache``) so that a killed bench resumes; with
        ``workers`` > 1 in a pool of worker processes, in the given order (longest first)."""
        out = {name: read_json(self.stage.path(name), f"bench stage {name}") for name in jobs if cache and self.stage.exists(name)}
        todo = {name: job for name, job in jobs.items() if name not in out}
        if self.workers <= 1 or len(todo) <= 1:
            for name, (method, args) in tqdm(todo.items(), desc=desc, unit="job", disable=not self.progress or len(todo) <= 1):
                out[name] = _run_job(self, name if cache else None, method, args)
            return {name: out[name] for name in jobs}
        pool = self._executor()
        futures = {pool.submit(_run_job, None, name if cache else None, method, args): name for name, (method, args) in todo.items()}
        for f in tqdm(
            as_completed(futures), total=len(futures), desc=f"{desc} ({self.workers} workers)", unit="job", disable=not self.progress
        ):
            out[futures[f]] = f.result()
        return {name: out[name] for name in jobs}

    def save_results(self, results: dict, report: str, folder: Path | None = None) -> None:
        """``results.json`` and ``report.md`` in the results folder (or ``folder``)."""
        folder = folder or self.out
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "results.json", results)
        atomic_write_bytes(folder / "report.md", report.encode())

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(type(self), self.cfg, str(self.out), threads),
            )
        return self._pool

    # ---- sampling and scoring --------------------------------------------------------------

    def sample(
        self,
        num: int,
        term: GuidanceTerm | list[GuidanceTerm] | None,
        seed: int,
        desc: str,
        conditioning: Conditioning | None = None,
        steps: int | None = None,
    ) -> tuple[Tensor, float]:
        """``num`` samples guided by ``term`` (None: unguided; a list: their sum), with the UNet's
        per-sample ``conditioning`` (prompts, classifier-free guidance), and the seconds they took;
        by the configuration's ``sampler`` where it has one, else DDIM, in ``steps`` steps (default:
        the configuration's)."""
        t0 = time.time()
        x = sample_images(
            self.pipe,
            num,
            seed=seed,
            terms=term if isinstance(term, list) else [term] if term is not None else [],
            conditioning=conditioning,
            batch_size=self.cfg.batch_size,
            progress=self.progress,
            desc=desc,
            num_inference_steps=steps or self.cfg.steps,
            sampler=getattr(self.cfg, "sampler", "ddim"),
        )
        return x, time.time() - t0

    def evaluator_classes(self, x: Tensor) -> Tensor:
        """The evaluator's predicted class of every image."""
        return evaluator_classes(self.evaluator, x)


def choose_scale(points: list[dict]) -> dict:
    """The sweep point a row runs at: highest evaluator accuracy; among points within 2 points
    of it, the lowest FID."""
    best = max(p["accuracy"] for p in points)
    return min((p for p in points if p["accuracy"] >= best - 0.02), key=lambda p: p["fid"])


def class_scores(evaluator: nn.Module, x: Tensor, targets: Tensor, num_classes: int, real_features: Tensor, full: bool = False) -> dict:
    """The evaluator's judgement of images x [N, C, H, W] guided toward classes ``targets`` [N]:
    accuracy, per-class accuracy (None for a class no sample asked for) and its minimum, FID
    against ``real_features``; ``full``: also KID, precision and recall."""
    hit = (evaluator_classes(evaluator, x) == targets).float()
    feats = features(evaluator, x)
    per_class = group_means(hit, targets, num_classes)
    out = {
        "n": len(x),
        "accuracy": hit.mean().item(),
        "per_class_accuracy": per_class,
        "per_class_min": min(v for v in per_class if v is not None),
        "fid": fid(feats, real_features),
    }
    if full:
        prec, rec = precision_recall(real_features[: len(x)], feats)
        out |= {"kid": kid(feats, real_features), "precision": prec, "recall": rec}
    return out


def group_means(values: Tensor, groups: Tensor, num_groups: int) -> list[float | None]:
    """The mean of ``values`` [N] over the samples of each group 0..num_groups-1 (``groups`` [N]),
    None for a group without samples (JSON has no NaN)."""
    sums = torch.zeros(num_groups).index_add_(0, groups, values.float())
    counts = torch.bincount(groups, minlength=num_groups)
    return [(s / c).item() if c else None for s, c in zip(sums, counts.tolist())]


def evaluator_classes(evaluator: nn.Module, x: Tensor) -> Tensor:
    """The evaluator's predicted class of every image."""
    return predict(evaluator, x).argmax(-1)


def finished_bank(directory: Path, train: TrainConfig) -> bool:
    """Whether ``directory`` holds a finished bank trained with ``train``."""
    if not (directory / BANK_MANIFEST).exists():
        return False
    m = load_manifest(directory)
    same = m.get("train") == json.loads(json.dumps(dataclasses.asdict(train)))  # == so that alpha 8 is 8.0
    return same and len(m["trained"]) == len(m["boundaries"]) - 1


def train_or_load_bank(
    guide: GuideModel,
    diffusion: Diffusion,
    train: TrainConfig,
    directory: Path,
    data: Callable[[], tuple[Tensor, Tensor | None]],
    progress: bool = True,
) -> ExpertBank:
    """A classifier's bank trained with ``train`` by the one training loop into ``directory`` on
    ``data()`` (images [N, C, H, W] in [-1, 1], and their labels or None; called only when
    something is left to train), resumed where it stopped, or just loaded when finished
    (read-only: two workers may load it at once). ``guide``'s net receives the adapters, and
    the bank trains where ``guide`` is."""
    if finished_bank(directory, train):
        return load_bank(guide, directory, schedule=diffusion.schedule).eval()
    sched = diffusion.schedule
    task = task_for(guide, diffusion.image_shape, "classification", tau=train.tau)
    router = TimestepRouter.parse(train.experts, sched.num_train_timesteps, sched.alphas_cumprod)
    bank = make_bank(guide, router, train.adapter_config(), seed=train.seed)
    images, labels = data()
    train_experts(bank, task, sched, images, train, directory, labels=labels, identity=guide.identity, progress=progress)
    bank.task = task  # as load_bank sets it: the guidance term reads the task off the bank
    return bank.eval()


_WORKER: Bench | None = None  # a pool worker's own bench, made once by _init_worker


def _init_worker(cls: type, cfg: Any, out: str, threads: int) -> None:
    global _WORKER
    exit_with_parent()
    torch.set_num_threads(threads)
    _WORKER = cls(cfg, Path(out), progress=False)


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """End this worker process when the process that started it dies: a killed bench must not
    leave its workers training on (a pool's workers otherwise finish their job first, and a bank
    takes many minutes)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # a dead parent's children are reparented
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_job(bench: Bench | None, stage_name: str | None, method: str, args: tuple) -> Any:
    bench = bench or _WORKER
    compute = lambda: getattr(bench, method)(*args)  # noqa: E731
    return bench.stage.get(stage_name, compute) if stage_name else compute()


def _init_fresh(threads: int) -> None:
    exit_with_parent()
    torch.set_num_threads(threads)


def in_fresh_process(fn: Callable, *args) -> Any:
    """``fn(*args)`` in a new interpreter (spawned, so nothing is inherited), with as many torch
    threads as this process has; its result is returned, its exceptions re-raised here, and its
    death (killed for memory) is an error, not a hang. A measurement's memory is then that of
    its own process alone."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_fresh, initargs=(torch.get_num_threads(),)) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:  # a worker killed from outside: on Linux, most often the kernel's out-of-memory killer
            raise PPAPError("the measuring process was killed (out of memory?)") from None


# --------------------------------------------------------------------------------------------
# step time and step memory
# --------------------------------------------------------------------------------------------


def mid_step(diffusion: Diffusion, steps: int) -> SamplingGrid:
    """The mid-noise step of a ``steps``-step DDIM grid, as a one-step grid."""
    grid = diffusion.schedule.grid(steps, "ddim")
    return grid[len(grid) // 2 : len(grid) // 2 + 1]


def time_steps(
    diffusion: Diffusion,
    guidances: dict[str, Guidance | None],
    batch: int,
    steps: int,
    repeats: int,
    whole: bool = False,
    cond: Conditioning | None = None,
) -> dict[str, float]:
    """Median seconds of one mid-noise DDIM step (of a ``steps``-step schedule) at ``batch`` for
    each method's guidance (None = unguided), timed round-robin so that a transient load on the machine hits
    every method alike. Round 0 warms up and is dropped. ``whole``: the whole ``steps``-step
    trajectory instead (so a bank's expert switches are in the time), divided by ``steps``.
    ``cond``: the UNet's conditions of the ``batch`` samples (the guidances built on
    ``diffusion.bind(cond)``), on the UNet's device."""
    device = next(iter(diffusion.parameters())).device
    x = torch.randn((batch,) + diffusion.image_shape, generator=torch.Generator().manual_seed(0)).to(device)
    step = diffusion.schedule.grid(steps, "ddim") if whole else mid_step(diffusion, steps)
    denoiser = diffusion if cond is None else diffusion.bind(cond)
    calls = {
        name: _synced(functools.partial(sample_ddim, denoiser, x, step, guidance=guidance), device) for name, guidance in guidances.items()
    }
    return {name: seconds / len(step) for name, seconds in round_robin_median(calls, repeats).items()}


def _synced(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``call``, waiting for a GPU's queued kernels so that its time is the work's, not the launch's."""
    if device.type != "cuda":
        return call
    return lambda: (call(), torch.cuda.synchronize(device))


def round_robin_median(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds, every round calling each once in turn
    so that a transient load on the machine hits them alike. Round 0 warms up and is dropped."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


class PeakMemory:
    """The peak memory of what runs inside ``with``: CUDA's allocator peak on a GPU, else the
    peak resident set (Linux: reset through ``clear_refs``). ``mib``: the peak; ``above_mib``:
    above what was held before (the loaded models); None where it cannot be measured."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.mib: float | None = None
        self.above_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()  # what an earlier measurement in this process left unreferenced
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
        else:
            self.before = _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mib = _proc_status_mib("VmHWM")
        if self.mib is not None and self.before is not None:
            self.above_mib = round(self.mib - self.before, 1)
            self.mib = round(self.mib, 1)


def step_memory(diffusion: Diffusion, x: Tensor, step: SamplingGrid, guidance: Guidance | None) -> dict:
    """The peak RSS of two guided steps above the RSS just before them (``step_memory_mib``; the
    load-time peak would hide everything but x0), and the process's peak RSS. Meant for a fresh
    process; Linux only for the step memory (None elsewhere)."""
    load_peak = _proc_status_mib("VmHWM")  # this process's own peak (ru_maxrss would carry the parent's over exec)
    with PeakMemory(torch.device("cpu")) as peak:
        for _ in range(2):
            sample_ddim(diffusion, x, step, guidance=guidance)
    if peak.mib is None or peak.above_mib is None or load_peak is None:
        scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss is KiB on Linux, bytes on macOS
        return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1), "step_memory_mib": None}
    return {"peak_rss_mib": round(max(load_peak, peak.mib), 1), "step_memory_mib": peak.above_mib}


def guided_step_memory(
    diffusion_ref: str,
    guide_ref: str,
    bank_dir: str | None,
    method: str,
    calibration: Calibration,
    batch: int,
    steps: int,
    target: Any = "all",
) -> dict:
    """``step_memory`` of ``method`` (with the bank in ``bank_dir``, if any) toward ``target``
    (default: the classes cycled), everything loaded here: run it in a fresh process."""
    pipe = load_pipeline(diffusion_ref, device="cpu")
    diffusion = pipe.diffusion
    guide = load_guide(guide_ref)
    bank = load_experts(bank_dir, copy.deepcopy(guide), diffusion) if bank_dir else None
    term = pipe.guidance_term(batch, guide=guide, experts=bank, target=target, method=method, classifier_scale=1.0, calibration=calibration)
    x = torch.randn((batch,) + diffusion.image_shape, generator=torch.Generator().manual_seed(0))
    return step_memory(diffusion, x, mid_step(diffusion, steps), term.build(diffusion) if term is not None else None)


def _proc_status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float | None:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs) and return the current RSS
    in MiB; None where that is not possible (then only the process-wide peak is reported)."""
    try:  # hand freed heap back first, so that memory the allocator kept does not hide the next peak
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_mib("VmRSS")


# --------------------------------------------------------------------------------------------
# machine, reports and figures
# --------------------------------------------------------------------------------------------


def machine() -> dict:
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_in_order(r: dict) -> dict:
    """A results dict's machine description, its keys in ``machine()``'s order (for the report)."""
    return in_order(r["machine"], ("cpu", "cores", "torch_threads", "torch", "cuda"))


def stage_times(seconds: dict) -> str:
    """The report's last line: every stage's seconds."""
    return "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items())


def in_order(d: dict, keys) -> dict:
    """``d`` with ``keys`` first, in that order (then any others): a dict read back from a stage
    file or results.json is sorted by name, a table or figure wants the bench's own order."""
    return {k: d[k] for k in keys if k in d} | d


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    pyplot().close(fig)


def bank_train_seconds(directory: Path) -> float:
    """The summed training seconds of every expert of the bank saved in ``directory``."""
    from ..bank_format import load_manifest

    return round(sum(s["seconds"] for s in load_manifest(directory)["stats"].values()), 1)
