"""``ppap ui``: a local web page (Gradio) that compares guidance methods side by side and shows
the x0 prediction while they sample. ``build_app()`` makes the page; ``launch()`` serves it.

Offline and private by default: Gradio's analytics and the hub's telemetry are off, hub ids
resolve from the local cache (``HF_HUB_OFFLINE=1`` unless the environment says otherwise), the
page needs no CDN, the server listens on the loopback interface only and makes no share link
unless asked. Bad input is the CLI's one-line ``ppap: error: ...`` in the page; uploads are
size-limited and read as images by PIL only.
"""

import os
import queue
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from . import zoo
from .io import PPAPError
from .ui_compare import METHODS, Cancelled, ModelCache, Request, marked_grid, run_comparison, summary, write_downloads

DEFAULTS = Request()
MAX_UPLOAD = "4mb"  # reference images: Gradio refuses larger uploads before they reach ppap
SUMMARY_HEADERS = ["method", "accuracy (judge)", "seconds", "scale", "guidance"]
NO_CLASS, ALL_CLASSES = "(none)", "all (cycled)"
LAYOUT_SOURCES = ("none", "reference image", "sketch")
# the /generate API's parameters, in order (gradio_client calls it positionally)
INPUT_NAMES = (
    "methods", "target", "layout_source", "reference", "sketch", "scale", "layout_scale", "steps", "num", "sampler", "seed",
    "diffusion", "guide", "experts", "noise_aware", "layout_guide", "layout_experts", "judge", "extra_terms",
    "class_label", "null_class_label", "cfg_scale",
)  # fmt: skip


def offline_environment() -> None:
    """Switch off Gradio's analytics and the hub's telemetry, and keep hub ids to the local cache
    unless ``HF_HUB_OFFLINE`` is set already; done before Gradio is imported."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # huggingface_hub reads these when first imported (diffusers may have imported it already)
        from huggingface_hub import constants

        constants.HF_HUB_DISABLE_TELEMETRY = True
        constants.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    except ImportError:
        pass


def _gradio():
    offline_environment()
    try:
        import gradio as gr
    except ImportError:
        raise PPAPError("ppap ui needs Gradio: pip install 'ppap[ui]' (or pip install 'gradio>=5')") from None
    return gr


def one_line(error: BaseException) -> str:
    """The CLI's line for an error: ``ppap: error: ...`` for bad input, else an internal error."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"ppap: error: {text}" if isinstance(error, PPAPError) else f"ppap: internal error: {type(error).__name__}: {text[:300]}"


def class_choices(cache: ModelCache, guide: str) -> list[str]:
    """The class target menu of a guide: its class names (indices when it has none)."""
    guide = guide.strip()
    if zoo.is_zoo_name(guide):
        classes = list(zoo.ZOO[guide].classes)
    else:
        model = cache.guide(guide)
        classes = list(model.classes or []) or [str(k) for k in range(int(getattr(model, "num_classes", 0) or 0))]
    return [NO_CLASS, ALL_CLASSES, *classes]


def scale_note(experts: str) -> str:
    """The scale field's note: empty means each method's default, a zoo bank's measured one shown."""
    entry = zoo.ZOO.get(experts)
    bank = f"; {experts}: {entry.scale:g}" if entry is not None and entry.scale else ""
    return f"empty: each method's default{bank}"


def progress_line(method: str, done: int, total: int, seconds: float, width: int = 20) -> str:
    """The status line while sampling: which column runs, a text progress bar, the time so far."""
    filled = round(width * done / max(total, 1))
    return f"sampling **{method}** (x0 prediction): step {done} of {total} `{'█' * filled}{'░' * (width - filled)}` {done / max(total, 1):.0%}, {seconds:.1f} s"


def sketch_to_image(sketch: Any, folder: Path) -> str | None:
    """A Sketchpad value -> a PNG of the drawn silhouette (white on black, as the zoo's images
    are), or None when nothing is drawn."""
    from PIL import Image

    if not isinstance(sketch, dict):
        return None
    layers = [np.asarray(layer) for layer in sketch.get("layers") or [] if layer is not None]
    if layers and all(layer.ndim == 3 and layer.shape[-1] == 4 for layer in layers):
        mask = np.any([layer[..., 3] > 0 for layer in layers], axis=0)
    elif sketch.get("composite") is not None:
        composite = np.asarray(sketch["composite"]).astype(np.float32)
        grey = composite[..., :3].mean(-1) if composite.ndim == 3 else composite
        mask = grey < 128  # dark strokes on the white canvas
    else:
        return None
    if not mask.any():
        return None
    path = folder / "sketch.png"
    Image.fromarray((mask * 220).astype(np.uint8), mode="L").save(path)
    return str(path)


def _blank_is_none(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _request(values: dict, folder: Path) -> tuple[Request, str | None]:
    """The page's values -> a ``Request`` and the layout reference file (upload or sketch)."""
    target = str(values["target"] or "").strip()
    target = "" if target == NO_CLASS else "all" if target == ALL_CLASSES else target
    source = values["layout_source"] or "none"
    reference = None
    if source == "reference image":
        upload = values["reference"]
        reference = upload if isinstance(upload, str) else getattr(upload, "name", None)
        if not reference:
            raise PPAPError("layout source 'reference image' needs an uploaded image")
    elif source == "sketch":
        reference = sketch_to_image(values["sketch"], folder)
        if reference is None:
            raise PPAPError("layout source 'sketch' needs a drawn silhouette")
    elif source not in LAYOUT_SOURCES:
        raise PPAPError(f"unknown layout source {source!r}; valid: {', '.join(LAYOUT_SOURCES)}")
    req = Request(
        **{k: values[k] for k in ("diffusion", "guide", "experts", "noise_aware", "layout_guide", "layout_experts", "judge")},
        methods=tuple(values["methods"] or ()),
        target=target,
        extra_terms=values["extra_terms"] or "",
        scale=_blank_is_none(values["scale"]),
        layout_scale=_blank_is_none(values["layout_scale"]),
        steps=values["steps"],
        sampler=values["sampler"],
        seed=values["seed"],
        num=values["num"],
        class_label=values["class_label"] or "",
        null_class_label=values["null_class_label"] or "",
        cfg_scale=values["cfg_scale"] if values["cfg_scale"] is not None else 1.0,
    )
    return req, reference


def build_app(cache: ModelCache | None = None):
    """The page, its queue (one job at a time) and its API (``/generate``)."""
    gr = _gradio()
    from .schedulers import SAMPLER_NAMES

    cache = cache or ModelCache()
    stops: dict[str, threading.Event] = {}  # session -> the stop switch of its running job
    with gr.Blocks(title="ppap: plug-and-play guidance", analytics_enabled=False) as app:
        gr.Markdown(
            "## ppap: plug-and-play guidance\nCompare guidance methods on the same noise. Each column shows the x0 prediction while "
            "it samples, then the samples, framed green where the judge sees the requested class and red where it does not."
        )
        choices = class_choices(cache, DEFAULTS.guide)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                inp: dict[str, Any] = {}
                inp["methods"] = gr.CheckboxGroup(list(METHODS), value=list(DEFAULTS.methods), label="methods")
                inp["target"] = gr.Dropdown(
                    choices,
                    value=DEFAULTS.target if DEFAULTS.target in choices else choices[-1],
                    label="class target",
                    allow_custom_value=True,
                )
                inp["layout_source"] = gr.Radio(list(LAYOUT_SOURCES), value="none", label="layout target (segmentation guide)")
                with gr.Tab("reference image"):
                    inp["reference"] = gr.File(label="reference image (PNG/JPEG)", file_types=["image"], type="filepath")
                with gr.Tab("sketch"):
                    inp["sketch"] = gr.Sketchpad(label="silhouette", canvas_size=(224, 224), type="numpy")
                with gr.Row():  # text, not gr.Number: an empty field (each method's default) must stay empty
                    inp["scale"] = gr.Textbox("", label="class scale", placeholder="default", info=scale_note(DEFAULTS.experts))
                    inp["layout_scale"] = gr.Textbox(
                        "", label="layout scale", placeholder="default", info=scale_note(DEFAULTS.layout_experts)
                    )
                with gr.Row():
                    inp["steps"] = gr.Slider(1, 100, value=DEFAULTS.steps, step=1, label="steps")
                    inp["num"] = gr.Slider(1, 64, value=DEFAULTS.num, step=1, label="images")
                with gr.Row():
                    inp["sampler"] = gr.Dropdown(list(SAMPLER_NAMES), value=DEFAULTS.sampler, label="sampler", allow_custom_value=True)
                    inp["seed"] = gr.Number(DEFAULTS.seed, precision=0, label="seed")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", elem_id="cancel")
                with gr.Accordion("models", open=False):
                    inp["diffusion"] = gr.Textbox(DEFAULTS.diffusion, label="diffusion model (folder, zoo name or hub id)")
                    inp["guide"] = gr.Textbox(DEFAULTS.guide, label="guide (off-the-shelf classifier)")
                    inp["experts"] = gr.Textbox(DEFAULTS.experts, label="experts (ppap)")
                    inp["noise_aware"] = gr.Textbox("", label="noise-aware bank (for the noise-aware method)")
                    inp["layout_guide"] = gr.Textbox(DEFAULTS.layout_guide, label="layout guide (segmenter)")
                    inp["layout_experts"] = gr.Textbox(DEFAULTS.layout_experts, label="layout experts")
                    inp["judge"] = gr.Textbox(DEFAULTS.judge, label="judge (classifier that never guides; empty: none)")
                    inp["extra_terms"] = gr.Textbox("", lines=2, label="further terms, one per line (as ppap sample --term)")
                with gr.Accordion("conditional diffusion model", open=False):
                    inp["class_label"] = gr.Textbox("", label="class label(s), e.g. 3 or 0,1,2")
                    inp["null_class_label"] = gr.Textbox("", label="null class label (for CFG)")
                    inp["cfg_scale"] = gr.Number(1.0, label="CFG scale (1 = off)")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    slots = {
                        m: gr.Image(label=m, visible=m in DEFAULTS.methods, interactive=False, format="png", elem_id=f"grid-{m}")
                        for m in METHODS
                    }
                table = gr.Dataframe(headers=SUMMARY_HEADERS, label="results", interactive=False, elem_id="results")
                files = gr.File(label="downloads: grid PNG and .npz", file_count="multiple", interactive=False)

        names = list(INPUT_NAMES)
        assert set(names) == set(inp), "INPUT_NAMES must list every input"
        outputs = [status, *slots.values(), table, files]

        def generate(request: gr.Request, *args):
            values = dict(zip(names, args))
            session = getattr(request, "session_hash", None) or "api"
            stop = stops[session] = threading.Event()
            folder = Path(tempfile.mkdtemp(prefix="ppap-ui-"))
            events: queue.Queue = queue.Queue()
            shown: dict[str, Any] = dict.fromkeys(METHODS)
            changed: set[str] = set()  # slots to send: an unchanged image is not encoded and sent again
            start = time.perf_counter()

            def work(req: Request, reference: str | None) -> None:
                try:
                    result = run_comparison(
                        cache,
                        req,
                        reference,
                        on_preview=lambda m, grid: events.put(("preview", m, grid)),
                        on_progress=lambda m, done, total: events.put(("progress", m, (done, total))),
                        on_result=lambda m, comparison: events.put(("result", m, comparison)),
                        stop=stop,
                    )
                    events.put(("done", None, result))
                except BaseException as e:  # handed to the page's thread
                    events.put(("error", None, e))

            def view(text: str, table_value: Any = None, files_value: Any = None) -> list:
                slots_out = [shown[m] if m in changed else gr.update() for m in METHODS]
                changed.clear()
                return [text, *slots_out, gr.update() if table_value is None else table_value, files_value]

            try:
                req, reference = _request(values, folder)
                yield view("starting...", [], None)
                threading.Thread(target=work, args=(req, reference), daemon=True).start()
                text, table_now = "", None
                while True:
                    batch = [events.get()]
                    while not events.empty():  # everything that came while the page was being updated: one update
                        batch.append(events.get())
                    for kind, method, payload in batch:
                        if kind == "progress":
                            text = progress_line(method, *payload, time.perf_counter() - start)
                        elif kind == "preview":
                            shown[method] = payload
                            changed.add(method)
                        elif kind == "result":  # a finished column: its samples, framed by the judge's verdicts
                            shown[method] = marked_grid(payload.results[method].images, payload.hits(method))
                            changed.add(method)
                            table_now = summary(payload)
                        elif kind == "error":
                            raise payload
                        else:
                            downloads = [str(p) for p in write_downloads(payload, folder)]
                            changed.update(METHODS)  # the last update carries every grid (an API caller's result)
                            yield view(f"done in {time.perf_counter() - start:.1f} s", summary(payload), downloads)
                            return
                    yield view(text, table_now)
                    table_now = None
            except Cancelled:
                yield view("cancelled")
            except Exception as e:
                if not isinstance(e, PPAPError):
                    traceback.print_exc(file=sys.stderr)  # a bug: the server log gets the traceback, the page one line
                raise gr.Error(one_line(e), print_exception=False) from None
            finally:
                stop.set()  # a closed or cancelled page stops the sampling thread at its next step

        def cancel(request: gr.Request) -> str:
            stop = stops.get(getattr(request, "session_hash", None) or "api")
            if stop is not None:
                stop.set()
            return "cancelling..."

        def show_columns(methods):
            return [gr.update(visible=m in (methods or ())) for m in METHODS]

        def refresh_classes(guide: str, current: str):
            try:
                choices = class_choices(cache, guide)
            except PPAPError as e:
                raise gr.Error(one_line(e), print_exception=False) from None
            keep = current in choices or not zoo.is_zoo_name(guide.strip())  # a typed index or list stays
            return gr.update(choices=choices, value=current if keep else choices[2] if len(choices) > 2 else NO_CLASS)

        job = generate_btn.click(
            generate, [inp[n] for n in names], outputs, api_name="generate", concurrency_limit=1, show_progress="hidden"
        )  # the status line is the progress bar: Gradio's own would cover the previews
        cancel_btn.click(cancel, None, status, cancels=[job], queue=False, api_name="cancel")
        inp["methods"].change(show_columns, inp["methods"], list(slots.values()), queue=False, api_name=False)
        for event in (inp["guide"].submit, inp["guide"].blur):
            event(refresh_classes, [inp["guide"], inp["target"]], inp["target"], api_name=False)
    app.queue(max_size=16)
    return app


def free_port(host: str) -> int:
    """A port the OS says is free on ``host`` (for ``--port 0``)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(
    host: str = "127.0.0.1", port: int = 7860, *, share: bool = False, device: str = "cpu", preload: bool = True, block: bool = True
):
    """Serve the page on ``host:port`` (0: a free port) and print its URL; ``preload`` loads the
    default models first, so that the first click samples at once. Returns (app, url)."""
    from .loading import resolve_device

    gr = _gradio()
    cache = ModelCache(str(resolve_device(device)))  # a bad --device: one line, before anything starts
    if preload:
        for load in (
            lambda: cache.pipeline(DEFAULTS.diffusion),
            lambda: cache.bank(DEFAULTS.experts, DEFAULTS.guide, DEFAULTS.diffusion),
            lambda: cache.guide(DEFAULTS.judge),
        ):
            try:
                load()
            except PPAPError as e:  # a zoo without a model: the page says so when it is asked for
                print(f"ppap ui: not preloaded: {one_line(e)}", file=sys.stderr)
    app = build_app(cache)
    port = free_port(host) if port == 0 else port
    try:
        _, _, share_url = app.launch(
            server_name=host,
            server_port=port,
            share=share,
            prevent_thread_lock=True,
            quiet=True,
            show_error=False,
            max_file_size=MAX_UPLOAD,
            ssr_mode=False,
            theme=gr.themes.Default(),  # its fonts are served by the server itself, not fetched from a CDN
        )
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise PPAPError(f"cannot serve on {host}:{port} ({str(e).splitlines()[0]})") from None
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    print(f"ppap ui: {url}" + (f" (share link: {share_url})" if share_url else ""), flush=True)
    if block:
        try:
            app.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            app.close()
    return app, url
