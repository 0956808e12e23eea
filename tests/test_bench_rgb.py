"""``ppap bench rgb``: colour fidelity on real colour images, and the quick bench end to end on tiny
colour models trained here by the zoo's own recipes (every row and metric in the table, a re-run
that samples nothing, bad flags in one line)."""

import json

import pytest
import torch

from ppap import PPAPError
from ppap.fashion_mnist import fashion_mnist_dir
from ppap.fashion_rgb import COLOUR_NAMES, COLOURS, colour_fidelity, garment_mask, load_fashion_rgb, nearest_colour, tint, to_unit

needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_data
def test_colour_fidelity_is_one_on_real_tinted_images_and_zero_on_mislabelled_colours():
    data = load_fashion_rgb("test")
    x, colours = data.images(slice(0, 400)), data.colours[:400]
    assert len(set(colours.tolist())) == 8  # every colour is in the sample
    assert colour_fidelity(x, colours) == 1.0
    assert colour_fidelity(x, (colours + 1) % 8) == 0.0  # each image named by its neighbour's colour
    assert colour_fidelity(x, (colours + 4) % 8) == 0.0
    # the same garment in every colour: named by its own colour each time
    grey = data.grey[:1].expand(8, -1, -1, -1)
    assert torch.equal(nearest_colour(to_unit(tint(grey, torch.arange(8)))), torch.arange(8))


def test_colour_fidelity_ignores_brightness_and_background_and_misses_empty_images():
    white, magenta = COLOUR_NAMES.index("white"), COLOUR_NAMES.index("magenta")
    grey = torch.zeros(3, 1, 8, 8)
    grey[:, :, 2:6, 2:6] = 110  # a mid-grey garment: its mean colour (white x 0.43) is nearer magenta than white in RGB distance
    x = to_unit(tint(grey, torch.tensor([white] * 3)))
    x[1, :, 0, 0] = to_unit(torch.tensor([20.0, 0.0, 0.0]))  # faint red noise on the background: below the garment threshold
    x[2] = -1  # no garment at all
    assert garment_mask(x)[0].sum() == 16 and garment_mask(x)[1].sum() == 16 and garment_mask(x)[2].sum() == 0
    dim = torch.tensor(COLOURS["white"]) * 110 / 255
    assert (dim - torch.tensor(COLOURS["magenta"])).norm() < (dim - torch.tensor(COLOURS["white"])).norm()
    assert nearest_colour(x).tolist() == [white, white, -1]
    assert colour_fidelity(x, torch.tensor([white] * 3)) == pytest.approx(2 / 3)
    assert colour_fidelity(x[:2], torch.tensor([magenta] * 2)) == 0.0


def test_pair_order_covers_every_pair_and_balances_every_prefix():
    from ppap.bench.rgb import pair_order

    pairs = pair_order()
    assert len(set(pairs)) == 80 and {c for c, _ in pairs} == set(range(8)) and {y for _, y in pairs} == set(range(10))
    assert [y for _, y in pairs[:10]] == list(range(10)) and {c for c, _ in pairs[:8]} == set(range(8))


@pytest.fixture(scope="module")
def tiny_rgb_models(tmp_path_factory):
    """The colour zoo in miniature, each by its recipe: the text-conditional DDPM, the three
    transformers models, and data-free banks of the classifier and the segmenter (corpus drawn
    with the colour prompts cycled, classifier-free guidance 3)."""
    if not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from ppap.fashion_rgb import colour_prompt
    from ppap.loading import load_guide, load_pipeline
    from ppap.recipes_rgb import TINY_RGB_DDPM_RECIPE, TINY_RGB_GUIDE_RECIPES, train_rgb_ddpm, train_rgb_guide
    from ppap.train import TrainConfig, data_free_experts

    root = tmp_path_factory.mktemp("rgb-zoo")
    models = {"diffusion": str(root / "ddpm")}
    train_rgb_ddpm(root / "ddpm", root / "work-ddpm", TINY_RGB_DDPM_RECIPE)
    for name, key in (("fashion-rgb-classifier", "guide"), ("fashion-rgb-segmenter", "segmenter"), ("fashion-rgb-evaluator", "evaluator")):
        train_rgb_guide(name, root / name, root / f"work-{name}", TINY_RGB_GUIDE_RECIPES[name])
        models[key] = str(root / name)
    pipe = load_pipeline(models["diffusion"])
    n = 8
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt([colour_prompt(k % 8) for k in range(n)], None, True)
    cond = pipe.conditioning(n, prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=3.0)
    train = TrainConfig(experts="5", iterations=1, batch_size=4, checkpoint_every=1)
    for guide, key, task in (("guide", "experts", "classification"), ("segmenter", "segmenter_experts", "segmentation")):
        work = root / f"work-{key}"
        data_free_experts(
            pipe, models["diffusion"], load_guide(models[guide]), work, corpus_size=n, cfg=train, corpus_steps=2, task_name=task,
            corpus_dir=root / "corpus", conditioning=cond, progress=False,
        )  # fmt: skip
        models[key] = str(work / "experts")
    return models


def _flags(models: dict) -> list[str]:
    return [arg for key, ref in models.items() for arg in (f"--{key.replace('_', '-')}", ref)]


def _files_and_mtimes(*dirs) -> dict:
    return {str(f): f.stat().st_mtime_ns for d in dirs for f in sorted(d.rglob("*")) if f.is_file()}


@needs_data
@pytest.mark.timeout(300)
def test_rgb_bench_quick_reports_every_row_and_metric_and_resumes(tiny_rgb_models, tmp_path, monkeypatch, capsys):
    from ppap.bench import common
    from ppap.bench.rgb import CLASSIFICATION_ROWS, QUICK, SEGMENTATION_ROWS
    from ppap.cli import main

    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", "rgb", "--quick", "--quiet", "--out", str(out), "--work-dir", str(work)] + _flags(tiny_rgb_models)
    steps_of, sample_images = {}, common.sample_images

    def recording(*args, desc, num_inference_steps, **kwargs):
        steps_of[desc] = num_inference_steps
        return sample_images(*args, desc=desc, num_inference_steps=num_inference_steps, **kwargs)

    monkeypatch.setattr(common, "sample_images", recording)
    assert main(argv) == 0
    monkeypatch.undo()
    r = json.loads((out / "results.json").read_text())
    cls, seg = r["main"]["classification"], r["main"]["segmentation"]
    assert set(cls) == set(CLASSIFICATION_ROWS) and set(seg) == set(SEGMENTATION_ROWS)
    # the layout rows again at each of layout_steps, with their own sweep; every other row at steps
    (layout_steps,) = QUICK.layout_steps
    extra = f"segmentation-{layout_steps}-steps"
    assert list(r["main"]) == ["classification", "segmentation", extra] and set(r["main"][extra]) == set(SEGMENTATION_ROWS)
    assert {d for d, n in steps_of.items() if n == layout_steps} == {d for d in steps_of if d.startswith(extra)} != set()
    assert {n for d, n in steps_of.items() if not d.startswith(extra)} == {QUICK.steps}
    n = QUICK.pairs * QUICK.per_pair
    for m in cls.values():
        assert m["n"] == n and 0 <= m["accuracy"] <= 1 and 0 <= m["colour_fidelity"] <= 1 and m["fid"] > 0
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 0 <= m["per_class_min"] <= m["accuracy"]
        assert m["per_class_accuracy"][QUICK.pairs :] == [None] * (10 - QUICK.pairs)  # the quick pairs hold classes 0..7 only
    for m in [*seg.values(), *r["main"][extra].values()]:
        assert m["n"] == QUICK.seg_targets and 0 <= m["iou"] <= 1 and 0 <= m["colour_fidelity"] <= 1
    for kind, rows in r["sweep"].items():  # every guided row was swept; its main-table scale is one of the swept
        assert set(rows) == {row for row in r["main"][kind] if row != "unguided"}
        assert all(r["main"][kind][row]["scale"] in [p["scale"] for p in points] for row, points in rows.items())
    s = r["summary"]
    assert s["ppap5_accuracy"] == cls["ppap-5"]["accuracy"] and s["segmentation_ppap5_iou"] == seg["ppap-5"]["iou"]
    assert s["segmentation_ppap5_iou_by_kind"] == {kind: r["main"][kind]["ppap-5"]["iou"] for kind in ("segmentation", extra)}
    assert s["ppap5_over_noise_aware_accuracy"] == pytest.approx(cls["ppap-5"]["accuracy"] / max(cls["noise-aware"]["accuracy"], 1e-9))
    assert s["lowest_colour_fidelity"] == min(m["colour_fidelity"] for rows in r["main"].values() for m in rows.values())
    assert r["real_reference"]["colour_fidelity"] == 1.0  # real tinted images are the colour they were tinted
    assert r["cost"]["unguided"]["ratio_to_unguided"] == 1.0
    assert {f"classification/{row}" for row in CLASSIFICATION_ROWS if row != "unguided"} <= set(r["cost"])
    assert r["noise_aware"]["labelled_images"] == QUICK.labelled_images and r["noise_aware"]["train"]["objective"] == "supervised"
    report = (out / "report.md").read_text()
    assert report == capsys.readouterr().out.split("results in")[0].rstrip("\n") + "\n"  # printed as written
    for row in CLASSIFICATION_ROWS:
        assert f"| {row} |" in report
    for column in ("accuracy", "worst class", "colour fidelity", "FID", "precision", "recall", "s / step", "foreground IoU"):
        assert f"| {column} |" in report
    assert "ppap-5 accuracy / noise-aware:" in report and report.count("*reference images*") == 2
    assert f"DDPM-{QUICK.steps}:" in report and f"DDPM-{layout_steps}:" in report
    for png in ("bench_rgb_grid.png", "bench_rgb_segmentation_grid.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "stages").exists() and (work / "stages" / "config.json").exists()  # stages in the work folder
    assert (work / "banks" / "noise-aware").is_dir()

    kept = _files_and_mtimes(work)
    sampled = []
    monkeypatch.setattr(common, "sample_images", lambda *a, **k: sampled.append(1))  # a re-run must not sample
    assert main(argv) == 0
    assert sampled == [] and _files_and_mtimes(work) == kept
    again = json.loads((out / "results.json").read_text())
    assert again["main"] == r["main"] and again["sweep"] == r["sweep"] and again["stage_seconds"] == r["stage_seconds"]

    # a main row cached at another scale than the sweep chooses (stages carried over from another
    # run) is stale: that row alone runs again, at the chosen scale
    stale = work / "stages" / "main-classification-naive.json"
    stale.write_text(json.dumps(json.loads(stale.read_text()) | {"scale": 12345.0}))
    monkeypatch.undo()
    rows_sampled = []
    sample = common.Bench.sample
    monkeypatch.setattr(common.Bench, "sample", lambda self, *a, **k: rows_sampled.append(a[3]) or sample(self, *a, **k))
    assert main(argv) == 0
    assert rows_sampled == [f"naive s={r['main']['classification']['naive']['scale']:g}"]
    redone = json.loads((out / "results.json").read_text())["main"]["classification"]["naive"]
    assert {k: v for k, v in redone.items() if k != "seconds"} == {
        k: v for k, v in r["main"]["classification"]["naive"].items() if k != "seconds"
    }


@needs_data
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--per-pair", "0"], "per-pair must be >= 1, got 0"),
        (["--cfg-scale", "nan"], "cfg-scale must be a finite number >= 1"),
        (["--layout-steps", "2,3"], "layout-steps must be step counts >= 1 other than steps (3), each once; got 3"),
        (["--layout-steps", "5,5"], "each once; got 5"),
        (["--layout-steps", "2,x"], "bad --layout-steps '2,x': use integers"),
        (["--evaluator", "no/such/folder"], "no/such/folder"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_rgb_bench_bad_flags_are_one_line_and_leave_nothing(tiny_rgb_models, tmp_path, capsys, extra, message):
    from ppap.cli import main

    models = dict(tiny_rgb_models, **({"evaluator": extra[1]} if extra[0] == "--evaluator" else {}))
    argv = ["bench", "rgb", "--quick", "--quiet", "--out", str(tmp_path / "out")] + _flags(models)
    assert main(argv + ([] if extra[0] == "--evaluator" else extra)) == 2
    err = capsys.readouterr().err
    # one line, no traceback (before it, the loading bars of the transformers models that did load)
    assert err.endswith("\n") and "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("ppap: error:") and message in last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "dense", "--quick", "--per-pair", "3"], "--per-pair applies to `ppap bench rgb` only"),
        (["bench", "classifier", "--quick", "--segmenter", "x"], "--segmenter applies to `ppap bench rgb` only"),
        (["bench", "rgb", "--quick", "--workers", "2"], "apply to `ppap bench classifier` only"),
        (["bench", "rgb", "--quick", "--dtype", "float16"], "apply to `ppap bench scale` only"),
    ],
)
def test_flags_of_another_suite_are_refused_in_one_line(argv, message, tmp_path, capsys):
    from ppap.cli import main

    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_comma_ints_reads_a_list_or_none_and_names_the_flag_of_a_word():
    from ppap.commands.common import comma_ints

    assert comma_ints("50,100", "--layout-steps") == (50, 100) and comma_ints("", "--layout-steps") == ()
    with pytest.raises(PPAPError, match=r"bad --layout-steps '50,x': use integers"):
        comma_ints("50,x", "--layout-steps")
