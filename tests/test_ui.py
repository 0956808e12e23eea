"""``ppap ui``: the page's API through gradio_client against a live server on 127.0.0.1 (each
control's effect, each bad input's one-line error with the server still serving), and one real
browser (Debian's chromium driven by Playwright) that must never leave the loopback address."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
if importlib.util.find_spec("gradio") is None or importlib.util.find_spec("gradio_client") is None:
    if IN_CI:
        raise ImportError("CI=true but gradio is not installed (pip install -e '.[ui]')")
    pytest.skip("gradio is not installed (pip install 'ppap[ui]')", allow_module_level=True)

from ppap import zoo  # noqa: E402
from ppap.ui import INPUT_NAMES, sketch_to_image  # noqa: E402

pytestmark = pytest.mark.skipif(
    not all(zoo.ZOO[n].available for n in ("fashion-ddpm", "fashion-classifier", "fashion-ppap5", "fashion-evaluator")),
    reason="the zoo's models are not built in this install",
)

STEPS, NUM = 4, 2  # tiny runs: the tests check effects, not quality


@pytest.fixture(scope="module")
def server():
    """The app on 127.0.0.1, a free port, in this process; the environment it changes restored."""
    from huggingface_hub import constants

    saved_env = {k: os.environ.get(k) for k in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE")}
    saved_constants = (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY)
    from ppap.ui import launch

    app, url = launch("127.0.0.1", 0, block=False)
    yield url
    app.close()
    for k, v in saved_env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY = saved_constants


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def arguments(**values) -> list:
    """``/generate``'s positional arguments: a tiny PPAP run toward 'trouser', ``values`` replacing some."""
    args = {"methods": ["ppap"], "target": "trouser", "layout_source": "none", "reference": None, "sketch": None}
    args |= {"scale": "", "layout_scale": "", "steps": STEPS, "num": NUM, "sampler": "ddim", "seed": 0}
    args |= {"diffusion": "fashion-ddpm", "guide": "fashion-classifier", "experts": "fashion-ppap5", "noise_aware": ""}
    args |= {"layout_guide": "fashion-segmenter", "layout_experts": "fashion-segmenter-ppap5", "judge": "fashion-evaluator"}
    args |= {"extra_terms": "", "class_label": "", "null_class_label": "", "cfg_scale": 1.0}
    args |= values
    return [args[n] for n in INPUT_NAMES]


def call(client, **values) -> dict:
    """``/generate``'s outputs as a dict: status, the five grids, table, files."""
    out = client.predict(*arguments(**values), api_name="/generate")
    return dict(zip(["status", "unguided", "naive", "ppap", "noise-aware", "x0", "table", "files"], out))


def samples(out: dict, method: str = "ppap") -> np.ndarray:
    npz = next(f for f in out["files"] if f.endswith(".npz"))
    with np.load(npz, allow_pickle=False) as data:
        return data[f"images_{method.replace('-', '_')}"]


def error_of(client, **values) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call(client, **values)
    return str(info.value)


def test_class_target_steps_and_seed(client):
    """A class target changes the PPAP samples, and the judge's accuracy is reported; the same
    seed reproduces them exactly, another seed, step count or sampler does not."""
    trouser = call(client, target="trouser")
    assert trouser["status"].startswith("done") and trouser["ppap"]
    bag = call(client, target="bag")
    assert samples(trouser).shape == (NUM, 32, 32, 1)
    assert not np.array_equal(samples(trouser), samples(bag))
    row = trouser["table"]["data"][0]
    assert row[0] == "ppap" and row[1].endswith("%") and row[3] == "30"  # the zoo bank's measured scale by default
    np.testing.assert_array_equal(samples(call(client, target="trouser")), samples(trouser))
    assert not np.array_equal(samples(call(client, target="trouser", seed=1)), samples(trouser))
    assert not np.array_equal(samples(call(client, target="trouser", steps=STEPS - 1)), samples(trouser))
    assert call(client, target="trouser", scale="5")["table"]["data"][0][3] == "5"
    assert not np.array_equal(samples(call(client, target="trouser", sampler="dpm++")), samples(trouser))


def test_methods_side_by_side_with_previews(client):
    """Every chosen method gets its grid and table row; x0 previews stream while it samples, and
    each column's samples and row show as soon as that method is done."""
    job = client.submit(*arguments(methods=["unguided", "naive", "ppap", "x0"]), api_name="/generate")
    final = job.result()
    outputs = job.outputs()
    assert final[0].startswith("done")
    assert [r[0] for r in final[6]["data"]] == ["unguided", "naive", "ppap", "x0"]
    assert all(final[1 + k] for k in (0, 1, 2, 4)) and final[4] is None  # noise-aware not chosen: no grid
    statuses = [o[0] for o in outputs]
    previews = [o for o in outputs[:-1] if "(x0 prediction)" in o[0]]
    assert len(previews) >= 4 and previews[0][1], statuses  # the first column's x0 shows before anything finishes
    first_done = next((o for o in outputs if isinstance(o[6], dict) and o[6].get("data")), None)
    assert first_done is not None and not first_done[0].startswith("done"), statuses
    assert [r[0] for r in first_done[6]["data"]] == ["unguided"] and first_done[1]  # a finished column shows at once


def test_layout_reference_guides(client, tmp_path):
    """An uploaded reference image (the segmenter's map of it is the target) changes PPAP's
    samples away from the unguided ones."""
    from gradio_client import handle_file
    from PIL import Image

    ref = np.zeros((28, 28), dtype=np.uint8)
    ref[4:24, 9:19] = 200  # a trouser-like bar
    Image.fromarray(ref).save(tmp_path / "ref.png")
    out = call(
        client,
        methods=["unguided", "ppap"],
        target="(none)",
        layout_source="reference image",
        reference=handle_file(str(tmp_path / "ref.png")),
    )
    assert out["status"].startswith("done")
    assert not np.array_equal(samples(out, "ppap"), samples(out, "unguided"))
    assert out["table"]["data"][1][1] == ""  # no class target: no verdicts


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"diffusion": "NOT_A_MODEL_DIR"}, "NOT_A_MODEL_DIR"),
        ({"scale": "nan"}, "guidance scale"),
        ({"extra_terms": "guide=fashion-classifier,target=bag,scale=nan"}, "guidance scale"),
        ({"layout_source": "reference image", "reference": "NOT_AN_IMAGE"}, "cannot read reference image"),
        ({"target": "dragon"}, "dragon"),
        ({"seed": None}, "seed"),
    ],
)
def test_bad_input_is_one_line_and_server_keeps_serving(client, tmp_path, values, expected):
    from gradio_client import handle_file

    if values.get("diffusion") == "NOT_A_MODEL_DIR":
        folder = tmp_path / "NOT_A_MODEL_DIR"
        folder.mkdir()
        (folder / "notes.txt").write_text("not a model")
        values = {"diffusion": str(folder)}
    if values.get("reference") == "NOT_AN_IMAGE":
        (tmp_path / "fake.png").write_text("this is text, not a PNG")
        values = values | {"reference": handle_file(str(tmp_path / "fake.png"))}
    message = error_of(client, **values)
    assert message.startswith("ppap: error: ") and "\n" not in message and "Traceback" not in message
    assert expected in message
    assert call(client)["status"].startswith("done")  # still serving


def test_conditional_model_class_label_and_cfg(client, tmp_path):
    """A class-conditional UNet (a folder): the class label and the CFG scale change the
    samples; a label the model does not have is the one-line error."""
    from diffusers import DDPMScheduler

    from ppap import Diffusion, NoiseSchedule

    from conftest import tiny_unet

    folder = tmp_path / "cond-ddpm"
    Diffusion(tiny_unet(num_class_embeds=3), NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100))).save_pretrained(folder)
    run = dict(diffusion=str(folder), methods=["unguided"], target="(none)")
    first = samples(call(client, **run, class_label="0"), "unguided")
    assert first.shape == (NUM, 8, 8, 1)
    assert not np.array_equal(first, samples(call(client, **run, class_label="1"), "unguided"))
    assert not np.array_equal(first, samples(call(client, **run, class_label="0", null_class_label="2", cfg_scale=3.0), "unguided"))
    assert "out of range" in error_of(client, **run, class_label="5")


def test_cancel_stops_the_job(client):
    job = client.submit(*arguments(methods=["unguided"], steps=100, num=16), api_name="/generate")
    deadline = time.time() + 60
    while not any(o and "(x0 prediction)" in str(o[0]) for o in job.outputs()) and time.time() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/cancel")
    start = time.time()
    while not job.done() and time.time() - start < 30:
        time.sleep(0.05)
    assert job.done()
    assert not any(str(o[0]).startswith("done") for o in job.outputs() if o)
    assert call(client)["status"].startswith("done")  # the next job runs


def test_x0_previews_converge_to_the_samples():
    """The previews are the x0 prediction, not x_t: halfway through 4 DDIM steps x0 is already
    close to the finished sample (mean error 9 grey levels here) while x_t is still noisy (52);
    the last preview is the sample itself."""
    from ppap.ui_compare import ModelCache, Request, marked_grid, run_comparison

    previews: list[np.ndarray] = []
    req = Request(methods=("unguided",), steps=STEPS, num=NUM, target="trouser")
    out = run_comparison(ModelCache(), req, on_preview=lambda m, g: previews.append(g), preview_every=1)
    final = marked_grid(out.results["unguided"].images).astype(int)
    errors = [float(np.abs(p.astype(int) - final).mean()) for p in previews]
    assert len(previews) == STEPS and errors[-1] == 0 and errors[1] < 25 < errors[0], errors


def test_sketch_to_image(tmp_path):
    """The drawn strokes (any colour) become a white-on-black silhouette; an empty canvas, none."""
    from PIL import Image

    layer = np.zeros((64, 64, 4), dtype=np.uint8)
    assert sketch_to_image({"background": None, "layers": [layer], "composite": None}, tmp_path) is None
    layer[10:50, 20:40] = (0, 0, 0, 255)
    path = sketch_to_image({"background": None, "layers": [layer], "composite": None}, tmp_path)
    img = np.asarray(Image.open(path))
    assert img.shape == (64, 64) and img[30, 30] > 0 and img[5, 5] == 0 and (img > 0).sum() == 40 * 20


def _browser() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


def test_browser_generates_without_leaving_loopback(server, tmp_path):
    """Debian's chromium opens the page, sets 4 steps and a class, clicks Generate and waits for
    the PPAP grid; every request the page makes goes to the loopback address."""
    chromium = _browser()
    playwright_missing = importlib.util.find_spec("playwright") is None
    if chromium is None or playwright_missing:
        reason = "no chromium found (apt-get install chromium)" if chromium is None else "playwright is not installed"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    hosts: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: hosts.append(urlparse(r.url).hostname or urlparse(r.url).scheme))
            page.goto(server)
            steps = page.get_by_label("number input for steps")
            steps.fill(str(STEPS))
            steps.press("Enter")
            images = page.get_by_label("number input for images")
            images.fill("4")
            images.press("Enter")
            target = page.get_by_label("class target")
            target.click()
            target.fill("trouser")
            page.get_by_role("option", name="trouser").click()
            page.click("#generate")
            page.wait_for_selector("#status :text('done in')", timeout=60_000)
            assert page.locator("#grid-ppap img").count() >= 1
            assert page.get_by_text("ppap fashion-classifier (classification) x30").count() == 1  # an empty scale is the default
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
            shutil.copy(tmp_path / "ui.png", "/tmp/ui_test_shot.png")
        finally:
            browser.close()
    assert (tmp_path / "ui.png").stat().st_size > 0
    assert "127.0.0.1" in hosts  # the requests were seen
    outside = sorted({h for h in hosts if h not in ("127.0.0.1", "localhost", "data", "blob")})
    assert not outside, f"the page made requests outside the loopback address: {outside}"
