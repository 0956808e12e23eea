"""The work behind ``ppap ui``: models loaded once, a side-by-side comparison of guidance methods
that reports the x0 prediction while it samples, the judge's verdicts, and the files to download.

Nothing here imports Gradio: ``ppap.ui`` lays out the page and calls ``run_comparison`` in a
worker thread, which reports through two callbacks and stops when its ``stop`` event is set.
"""

from __future__ import annotations

import copy
import io
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import zoo
from .batch_sampling import sample_images
from .commands.common import finite_number
from .commands.terms import build_term, parse_term
from .images import image_grid, labelled_grid, load_reference_image, png_bytes, to_hwc_uint8
from .io import PPAPError, atomic_write_bytes
from .loading import load_experts, load_guide, load_pipeline
from .pipeline import PPAPPipeline
from .schedulers import sampling_scheduler

METHODS = ("unguided", "naive", "ppap", "noise-aware", "x0")
MAX_IMAGES = 64
MAX_STEPS = 1000
HIT, MISS = (0, 170, 0), (210, 30, 30)  # frame colours of an image the judge agrees / disagrees with


class Cancelled(Exception):
    """The user pressed Cancel: sampling stops at the next step."""


class ModelCache:
    """Models by reference (folder, zoo name or hub id), each loaded once and kept. Guides stay
    unadapted: a bank is loaded on its own copy of its guide."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._items: dict[tuple, Any] = {}
        self._lock = threading.RLock()  # a bank loads its guide and pipeline through the cache

    def _get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._items:
                self._items[key] = load()  # a failed load raises and caches nothing
            return self._items[key]

    def pipeline(self, ref: str) -> PPAPPipeline:
        return self._get(("diffusion", ref), lambda: load_pipeline(_ref(ref, "diffusion model"), device=self.device))

    def guide(self, ref: str):
        return self._get(("guide", ref), lambda: load_guide(_ref(ref, "guide")).to(self.device))

    def bank(self, ref: str, guide_ref: str, diffusion_ref: str):
        def load():
            guide = copy.deepcopy(self.guide(guide_ref))
            return load_experts(_ref(ref, "experts"), guide, self.pipeline(diffusion_ref).diffusion).to(self.device)

        return self._get(("experts", ref, guide_ref, diffusion_ref), load)


def _ref(ref: str, what: str) -> str:
    ref = (ref or "").strip()
    if not ref:
        raise PPAPError(f"no {what} given: name a folder, a zoo name or a hub id")
    return ref


@dataclass
class Request:
    """Everything the page asks for. ``target``: a class (name, index, comma list or 'all'), or
    empty for none; ``reference``: an image file whose clean segmentation is the layout target."""

    diffusion: str = "fashion-ddpm"
    guide: str = "fashion-classifier"
    experts: str = "fashion-ppap5"
    noise_aware: str = ""  # a noise-aware bank of the guide (the zoo has none)
    methods: tuple[str, ...] = ("unguided", "naive", "ppap", "x0")
    target: str = "ankle boot"
    layout_guide: str = "fashion-segmenter"
    layout_experts: str = "fashion-segmenter-ppap5"
    reference: str | None = None
    extra_terms: str = ""  # one `ppap sample --term` spec per line
    scale: float | None = None  # None: each method's default
    layout_scale: float | None = None
    steps: int = 25
    sampler: str = "ddim"
    seed: int = 0
    num: int = 16
    class_label: str = ""  # conditional diffusion models
    null_class_label: str = ""
    cfg_scale: float = 1.0
    judge: str = "fashion-evaluator"

    def check(self) -> None:
        """One-line errors for bad values, before anything loads; numbers given as text become numbers."""
        if not self.methods:
            raise PPAPError("choose at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise PPAPError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
        for name, lo, hi in (("steps", 1, MAX_STEPS), ("number of images", 1, MAX_IMAGES)):
            value = finite_number(self.steps if name == "steps" else self.num, name)
            if value is None or value != int(value) or not lo <= value <= hi:
                raise PPAPError(f"{name} must be an integer {lo}..{hi}, got {value}")
        seed = finite_number(self.seed, "seed")
        if seed is None or seed != int(seed):
            raise PPAPError(f"seed must be an integer, got {self.seed!r}")
        self.scale = finite_number(self.scale, "guidance scale")
        self.layout_scale = finite_number(self.layout_scale, "layout guidance scale")
        cfg = finite_number(self.cfg_scale, "CFG scale")
        self.cfg_scale = 1.0 if cfg is None else cfg
        self.steps, self.num, self.seed = int(self.steps), int(self.num), int(self.seed)


@dataclass
class MethodResult:
    method: str
    images: np.ndarray  # uint8 [N, H, W, C]
    seconds: float
    scales: list[float]  # of its guidance terms
    description: str
    verdicts: np.ndarray | None = None  # the judge's class per image [N]
    accuracy: float | None = None


@dataclass
class Comparison:
    results: dict[str, MethodResult] = field(default_factory=dict)
    targets: np.ndarray | None = None  # class targets [N] (when a class guides)
    classes: tuple[str, ...] | None = None
    judge: str | None = None

    def hits(self, method: str) -> np.ndarray | None:
        r = self.results[method]
        return None if r.verdicts is None or self.targets is None else r.verdicts == self.targets


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _conditioning(pipe: PPAPPipeline, req: Request):
    def labels(text: str, what: str):
        if not text.strip():
            return None
        try:
            return torch.tensor([int(v) for v in text.split(",")])
        except ValueError:
            raise PPAPError(f"bad {what} {text!r}: use integers, e.g. '3' or '0,1,2' (cycled)") from None

    return pipe.conditioning(
        req.num,
        class_labels=labels(req.class_label, "class label"),
        negative_class_labels=labels(req.null_class_label, "null class label"),
        guidance_scale=req.cfg_scale,
    )


def _bank_for(cache: ModelCache, req: Request, method: str, guide: str, experts: str, what: str):
    if method == "ppap":
        if not experts.strip():
            raise PPAPError(f"ppap needs the {what} experts (a folder, zoo name or hub id)")
        return cache.bank(experts, guide, req.diffusion)
    if method == "noise-aware":
        if not req.noise_aware.strip() or what != "class":
            raise PPAPError(f"noise-aware needs a noise-aware bank of the {what} guide; leave the method out")
        return cache.bank(req.noise_aware, guide, req.diffusion)
    return None


def method_terms(cache: ModelCache, pipe: PPAPPipeline, req: Request, method: str, reference: Tensor | None) -> list:
    """The guidance terms of one column: the class term, the layout term, the extra terms, each
    with the column's method (an extra term's own ``method=`` wins, as in ``ppap sample``)."""
    if method == "unguided":
        return []
    terms = []
    if req.target.strip():
        bank = _bank_for(cache, req, method, req.guide, req.experts, "class")
        guide = cache.guide(req.guide)
        terms.append(pipe.guidance_term(req.num, guide=guide, experts=bank, target=req.target, method=method, classifier_scale=req.scale))
    if reference is not None:
        bank = _bank_for(cache, req, method, req.layout_guide, req.layout_experts, "layout")
        guide = cache.guide(req.layout_guide)
        terms.append(
            pipe.guidance_term(req.num, guide=guide, experts=bank, target_image=reference, method=method, classifier_scale=req.layout_scale)
        )
    for line in filter(None, (s.strip() for s in req.extra_terms.splitlines())):
        kw = parse_term(line)
        kw.setdefault("method", method)
        terms.append(build_term(pipe, req.num, fit=_fit(req.diffusion), **kw))
    terms = [t for t in terms if t is not None]
    if not terms:
        raise PPAPError(f"method {method!r} has nothing to guide toward: choose a class, a reference image or a sketch")
    return terms


def _fit(diffusion: str) -> str:
    return zoo.ZOO[diffusion].reference_fit if zoo.is_zoo_name(diffusion) else "resize"


def run_comparison(
    cache: ModelCache,
    req: Request,
    reference_path: str | None = None,
    *,
    on_preview: Callable[[str, np.ndarray], None] = lambda m, grid: None,
    on_progress: Callable[[str, int, int], None] = lambda m, done, total: None,
    on_result: Callable[[str, Comparison], None] = lambda m, comparison: None,
    stop: threading.Event | None = None,
    preview_every: int | None = None,
) -> Comparison:
    """Sample ``req.num`` images per method (same seed: the same x_T in every column), sending
    the x0 prediction grid every ``preview_every`` steps (default: about 6 per method), the
    step count after each step and the comparison so far after each method; ``stop`` set ends
    it with ``Cancelled``."""
    req.check()
    stop = stop or threading.Event()
    pipe = cache.pipeline(req.diffusion)
    sampling_scheduler(pipe.scheduler, req.sampler, req.steps)  # a bad sampler or step count: one line, now
    cond = _conditioning(pipe, req)
    reference = load_reference_image(reference_path, pipe.image_shape, _fit(req.diffusion)) if reference_path else None
    columns = {m: method_terms(cache, pipe, req, m, reference) for m in req.methods}
    out = Comparison()
    firsts = [terms[0] for terms in columns.values() if terms]  # with a class target, each column's first term is the class term
    class_term = firsts[0] if req.target.strip() and firsts and firsts[0].task.name == "classification" else None
    judge = cache.guide(req.judge) if req.judge.strip() and class_term is not None else None
    if class_term is not None:
        out.targets = class_term.targets.cpu().numpy()
        out.classes = getattr(cache.guide(req.guide), "classes", None)
    every = preview_every or max(1, req.steps // 6)
    total = req.steps * len(columns)
    for k, (method, terms) in enumerate(columns.items()):

        def step_end(pipe, i, t, kwargs, method=method, k=k):
            if stop.is_set():
                raise Cancelled()
            on_progress(method, min(k * req.steps + i + 1, total), total)  # (Heun calls back twice a step)
            if i % every == 0 or i == req.steps - 1:
                on_preview(method, preview_grid(kwargs["x0"]))
            return {}

        start = time.perf_counter()
        x = sample_images(
            pipe,
            req.num,
            seed=req.seed,
            terms=terms,
            conditioning=cond,
            batch_size=req.num,
            progress=False,
            num_inference_steps=req.steps,
            sampler=req.sampler,
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents", "x0"],
        )
        seconds = time.perf_counter() - start
        result = MethodResult(
            method, to_hwc_uint8(x), seconds, [t.scale for t in terms], " + ".join(t.description for t in terms) or "unguided"
        )
        if judge is not None and out.targets is not None:
            with torch.no_grad():
                result.verdicts = judge(x.to(next(judge.parameters()).device)).argmax(-1).cpu().numpy()
            result.accuracy = float((result.verdicts == out.targets).mean())
            out.judge = req.judge
        out.results[method] = result
        on_result(method, out)
    return out


# --------------------------------------------------------------------------------------------
# pictures and files
# --------------------------------------------------------------------------------------------


def _nrow(n: int) -> int:
    return max(1, int(np.ceil(np.sqrt(n))))


def _rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]


def marked_grid(images: np.ndarray, hits: np.ndarray | None = None, zoom: int = 3) -> np.ndarray:
    """uint8 [N, H, W, C] -> an RGB grid, each image enlarged ``zoom`` times and framed green
    (the judge agrees) or red (it does not) when ``hits`` [N] is given."""
    big = _rgb(images).repeat(zoom, axis=1).repeat(zoom, axis=2)
    if hits is not None:
        big = np.pad(big, ((0, 0), (2, 2), (2, 2), (0, 0)))
        for k, hit in enumerate(hits):
            frame = np.array(HIT if hit else MISS, dtype=np.uint8)
            big[k, :2], big[k, -2:], big[k, :, :2], big[k, :, -2:] = frame, frame, frame, frame
    return image_grid(big, _nrow(len(images)))


def preview_grid(x0: Tensor) -> np.ndarray:
    """The x0 prediction [N, C, H, W] (about [-1, 1]) as a grid like the results'."""
    return marked_grid(to_hwc_uint8(x0.detach().float().clamp(-1, 1).cpu()))


def write_downloads(comparison: Comparison, folder: str | Path | None = None) -> list[Path]:
    """``ppap-comparison.png`` (the marked grids side by side, method names above) and
    ``ppap-samples.npz`` (``images_<method>`` uint8 [N, H, W, C], ``targets``, ``verdicts_<method>``)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="ppap-ui-"))
    grids = np.stack([marked_grid(r.images, comparison.hits(m)) for m, r in comparison.results.items()])
    png = png_bytes(labelled_grid(grids, rows=[""], cols=list(comparison.results), zoom=1))
    arrays: dict[str, np.ndarray] = {f"images_{m.replace('-', '_')}": r.images for m, r in comparison.results.items()}
    arrays |= {f"verdicts_{m.replace('-', '_')}": r.verdicts for m, r in comparison.results.items() if r.verdicts is not None}
    if comparison.targets is not None:
        arrays["targets"] = comparison.targets
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    files = [folder / "ppap-comparison.png", folder / "ppap-samples.npz"]
    atomic_write_bytes(files[0], png)
    atomic_write_bytes(files[1], npz.getvalue())
    return files


def summary(comparison: Comparison) -> list[list]:
    """One row per method: method, accuracy (by the judge), seconds, scale(s), description."""
    rows = []
    for m, r in comparison.results.items():
        acc = "" if r.accuracy is None else f"{r.accuracy:.0%}"
        rows.append([m, acc, round(r.seconds, 2), ", ".join(f"{s:g}" for s in r.scales), r.description])
    return rows
