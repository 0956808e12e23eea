"""The benchmarks cannot rot: their --quick versions run end to end here (real zoo models, tiny
sizes), resume from their saved stages, and report every row and column."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ppap import zoo
from ppap.fashion_mnist import fashion_mnist_dir

needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def needs(*names):
    missing = [n for n in names if not zoo.ZOO[n].available]
    return pytest.mark.skipif(bool(missing), reason=f"zoo models not built in this checkout: {missing}")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole bench in small (~5-8 min on one of 2 cores beside the other tests)
@needs_data
@needs("fashion-ddpm", "fashion-classifier", "fashion-evaluator")
def test_classifier_bench_quick_runs_and_resumes(tmp_path):
    from ppap.bench.classifier import run_classifier_bench
    from ppap.bench.classifier_tables import NORMALIZED_SCALES, ROWS

    out = tmp_path / "bench"
    r = run_classifier_bench(out, quick=True, progress=False)
    assert list(r["main"]) == [row.name for row in ROWS]
    assert all(m["n"] == 20 and 0 <= m["accuracy"] <= 1 and m["fid"] > 0 for m in r["main"].values())
    assert all(0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 for m in r["main"].values())
    banks = r["banks"]
    assert banks["mes5"]["trainable_parameters"] == 5 * banks["mes5"]["backbone_parameters"]
    assert banks["ppap5"]["trainable_parameters"] == 5 * banks["ppap1"]["trainable_parameters"]
    assert banks["ppap5"]["trainable_parameters"] < banks["noise-aware"]["trainable_parameters"]
    assert banks["mes5"]["labelled_images"] > 0 and banks["ppap5"]["labelled_images"] == 0
    full = banks["ppap1-full-tau1"]  # data-free, in the noise-aware model's form and steps
    assert full["labelled_images"] == 0 and full["trainable_parameters"] == banks["noise-aware"]["trainable_parameters"]
    assert full["train"]["tau"] == 1.0 and full["train"]["iterations"] == banks["noise-aware"]["train"]["iterations"]
    cost = r["cost"]
    assert cost["unguided"]["ratio_to_unguided"] == 1.0
    assert cost["x0"]["ratio_to_unguided"] > cost["x0-shortcut"]["ratio_to_unguided"]  # the UNet backward it skips
    for name, points in r["sweep"].items():  # every guided row was swept, and its main-table scale is one of the swept
        assert r["main"][name]["scale"] in [p["scale"] for p in points]
    assert set(r["noise"]["routed"]) >= {"off-the-shelf", "noise-aware", "multi-expert-supervised-5", "ppap-5"}
    assert len(r["noise"]["per_expert"]["ppap-5"]) == 5
    ablations = r["ablations"]
    assert {a["factor"] for a in ablations.values()} == {"base", "recipe", "training", "guidance", "diagnosis"}
    diagnosis = [name for name, a in ablations.items() if a["factor"] == "diagnosis"]
    assert len(diagnosis) == 13  # noise-aware in each range (5), the recipe on other images (3), one full model (5)
    on_real, recipe = ablations["default recipe on real images (no labels)"], ablations["default recipe (the winners together)"]
    assert on_real["data"] == "real" and recipe["data"] == "corpus" and on_real["train"] == recipe["train"]  # only the images differ
    real_bank = load_file(out / "banks" / "ablation-default_recipe_on_real_images__no_labels" / "expert_4" / "adapter_model.safetensors")
    recipe_bank = load_file(out / "banks" / "ppap5-recipe" / "expert_4" / "adapter_model.safetensors")
    assert real_bank.keys() == recipe_bank.keys() and any(not torch.equal(real_bank[k], recipe_bank[k]) for k in real_bank)
    from ppap.corpus import load_corpus

    larger, corpus = load_corpus(out / "corpus-96"), load_corpus(out / "corpus")  # the 3x corpus row's, beside the bench's 32
    assert len(larger) == 96 and (larger[:32] - corpus).abs().max() <= 2 / 127.5  # the same first samples (batching aside)
    assert ablations["sharpened teacher (tau 0.25)"]["train"] == recipe["train"] | {"tau": 0.25}  # only the teacher's temperature differs
    assert ablations["PPAP-5 (base)"]["train"]["tau"] == 0.25  # the paper's plain recipe keeps the official code's teacher
    assert ablations["rank 32"]["trainable_per_expert"] > 3 * ablations["PPAP-5 (base)"]["trainable_per_expert"]  # LoRA: 4x, norms: same
    assert ablations["PPAP-5 (base)"]["noisy_accuracy"] is None and ablations["warm start"]["noisy_accuracy_mean"] is not None
    assert ablations["gradient normalisation"]["guided"]["scale"] in NORMALIZED_SCALES
    assert all(a["guided"]["n"] == 10 and 0 <= a["guided"]["per_class_min"] <= a["guided"]["accuracy"] for a in ablations.values())
    report = (out / "report.md").read_text()
    assert "PPAP-5 accuracy / multi-expert-supervised-5" in report and "x0-shortcut-calibrated" in report
    assert "ppap-1 (full copy, tau 1) / noise-aware: accuracy" in report
    for png in ("bench_sweep.png", "bench_noise_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    kept = _files_and_mtimes(out / "stages", out / "banks")
    again = run_classifier_bench(out, quick=True, progress=False)  # every stage is read back, nothing retrained
    assert again["main"] == json.loads(json.dumps(r["main"])) and _files_and_mtimes(out / "stages", out / "banks") == kept
    assert again["stage_seconds"] == r["stage_seconds"]  # a stage read back keeps the time it took when computed
    import dataclasses

    from ppap.bench.classifier_tables import QUICK

    some = ("rank 32", "PPAP-5 (base)", "default recipe (the winners together)")
    winners = run_classifier_bench(out, cfg=dataclasses.replace(QUICK, ablations=some, extra_rows=()), progress=False)
    assert list(winners["ablations"]) == ["PPAP-5 (base)", "default recipe (the winners together)", "rank 32"]  # table order
    assert all(winners["ablations"][n] == json.loads(json.dumps(r["ablations"][n])) for n in some)  # read back
    default_rows = [row.name for row in ROWS if not row.extra]  # make bench's table: the extra rows left out
    assert list(winners["main"]) == default_rows and all(winners["main"][n] == again["main"][n] for n in default_rows)
    assert "ppap10" not in winners["banks"] and "x0-shortcut-calibrated" not in (out / "report.md").read_text()
    assert _files_and_mtimes(out / "stages", out / "banks") == kept


def _files_and_mtimes(*dirs) -> dict:
    """Every file under ``dirs`` with its modification time: equal before and after a re-run
    means it recomputed, retrained and rewrote nothing (a wall-clock bound would fail on a busy machine)."""
    return {str(f): f.stat().st_mtime_ns for d in dirs for f in sorted(d.rglob("*")) if f.is_file()}


DENSE_MODELS = ("fashion-ddpm", "fashion-evaluator", "fashion-segmenter", "fashion-edges", "fashion-segmenter-ppap5", "fashion-edges-ppap5")


@pytest.fixture(scope="module")
def dense_quick(tmp_path_factory):
    """One quick dense bench for the tests below: (results folder, its results)."""
    from ppap.bench.dense import run_dense_bench

    out = tmp_path_factory.mktemp("dense")
    return out, run_dense_bench(out, quick=True, progress=False)


@pytest.mark.slow
@needs_data
@needs(*DENSE_MODELS)
def test_dense_bench_quick_runs(dense_quick):
    out, r = dense_quick
    seg, dense = r["main"]["segmentation"], r["main"]["dense"]
    assert set(seg) == set(dense) == {"unguided", "naive", "x0", "ppap", "reference images"}
    assert all(0 <= s["iou"] <= 1 and 0 <= s["class_hit"] <= 1 for s in seg.values())
    assert all(s["l1"] >= 0 and -1 <= s["pearson"] <= 1 for s in dense.values())
    assert seg["reference images"]["iou"] > 0.5  # the segmenter's own masks agree with the thresholded references
    assert r["cost"]["segmentation/x0"] > r["cost"]["segmentation/ppap"]
    assert (out / "bench_dense_grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@needs_data
@needs(*DENSE_MODELS)
def test_dense_bench_resumes_and_keeps_its_stage_times(dense_quick):
    """A resumed dense bench reads every stage back and reports the seconds each took when it
    was computed (not the ~0 s of reading it back), so its results and report stay as they were."""
    from ppap.bench.dense import run_dense_bench

    out, r = dense_quick
    first = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert list(r["stage_seconds"]) == ["cost", "sweep", "main"] and r["stage_seconds"]["sweep"] > 0
    again = run_dense_bench(out, quick=True, progress=False)
    second = json.loads((out / "results.json").read_text())
    assert second["stage_seconds"] == first["stage_seconds"] and list(again["stage_seconds"]) == ["cost", "sweep", "main"]
    assert second["main"] == first["main"] and second["cost"] == first["cost"] and second["sweep"] == first["sweep"]
    assert (out / "report.md").read_text() == report
    assert "Segmentation (target: fashion-segmenter's label map" in report and "PPAP vs naive: IoU" in report
    times = r["stage_seconds"]
    assert f"Stage times (s): cost {times['cost']}, sweep {times['sweep']}, main {times['main']}" in report


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_step_memory_sees_a_peak_below_the_load_time_peak():
    """The bench's step memory resets the kernel's peak-RSS mark first, so an allocation smaller
    than an earlier, larger one still shows (the process-wide peak would hide it). In a fresh
    process, as the bench measures it: freed memory an allocator keeps resident is reused unseen."""
    import subprocess
    import sys

    code = """
import torch
from ppap.bench.common import _proc_status_mib, _reset_peak_rss
big = torch.ones(96 * 2**20 // 4); big += 1; del big      # an earlier, larger peak (96 MiB)
before = _reset_peak_rss()
small = torch.ones(32 * 2**20 // 4); small += 1           # 32 MiB during the "step"
print(_proc_status_mib("VmHWM") - before)
"""
    extra = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 28 <= extra <= 64


def test_a_results_folder_refuses_stages_of_another_configuration(tmp_path):
    """Resuming with other settings would silently mix two experiments in one table."""
    import dataclasses

    from ppap.bench.classifier_tables import QUICK
    from ppap.bench.common import _Stage
    from ppap.io import PPAPError

    stage = _Stage(tmp_path)
    stage.check_config(dataclasses.asdict(QUICK))
    stage.check_config(dataclasses.asdict(dataclasses.replace(QUICK, workers=2)))  # how it runs, not what it measures
    stage.check_config(dataclasses.asdict(dataclasses.replace(QUICK, ablations=(), extra_rows=())))  # which cached rows it adds
    with pytest.raises(PPAPError, match=rf"another bench configuration \(per_class: {QUICK.per_class} there, 3 here\)"):
        stage.check_config(dataclasses.asdict(dataclasses.replace(QUICK, per_class=3)))
    with pytest.raises(PPAPError, match=r"\(per_class, seed differ\)"):  # every differing field, in the config's order
        stage.check_config(dataclasses.asdict(dataclasses.replace(QUICK, per_class=3, seed=QUICK.seed + 1)))


def test_ablation_choice_is_checked_and_kept_in_table_order():
    from ppap.bench.classifier_tables import BenchConfig, _ablations, ablation_names
    from ppap.io import PPAPError

    table = list(_ablations(800))
    assert ablation_names("all") == table
    assert not [n for n in table if "," in n]  # --ablations takes a comma list
    assert ablation_names(("rank 32", "PPAP-5 (base)")) == ["PPAP-5 (base)", "rank 32"]
    assert ablation_names(BenchConfig().ablations) == []  # make bench: the main table only
    with pytest.raises(PPAPError, match="unknown ablation 'rank 99'"):
        ablation_names(("rank 32", "rank 99"))


def test_the_main_tables_rows_are_the_default_ones_and_the_extra_rows_asked_for():
    from ppap.bench.classifier_tables import ROWS, BenchConfig, table_rows
    from ppap.io import PPAPError

    names = [row.name for row in table_rows(BenchConfig().extra_rows)]  # make bench
    assert "ppap-10" not in names and "x0-shortcut" not in names
    assert {"unguided", "naive", "noise-aware", "multi-expert-supervised-5", "ppap-1", "ppap-5", "x0"} <= set(names)
    assert table_rows("all") == ROWS
    both = [row.name for row in table_rows(("x0-shortcut", "ppap-10"))]
    assert both == [row.name for row in ROWS if not row.extra or row.name in ("ppap-10", "x0-shortcut")]  # table order
    with pytest.raises(PPAPError, match="unknown extra row 'ppap-5'"):  # a default row is not an extra one
        table_rows(("ppap-5",))


def test_a_stage_that_adds_jobs_to_a_finished_one_adds_their_time(tmp_path):
    """A row added to a finished table computes only its own jobs: the stage's recorded time is
    the first call's plus this one's, not this call's alone."""
    import time

    from ppap.bench.common import Bench, _Stage

    bench = Bench.__new__(Bench)  # only the stage bookkeeping: no models
    bench.stage, bench._recorded, bench.timings = _Stage(tmp_path), {}, {}
    bench.timed("main", lambda: time.sleep(0.2), cached=False, save=False)
    first = bench.timings["main"]
    bench.timed("main", lambda: time.sleep(0.3), cached=False, save=False, partly=True)
    assert first >= 0.2 and bench.timings["main"] >= first + 0.3
    assert json.loads((tmp_path / "stages" / "seconds.json").read_text())["main"] == bench.timings["main"]
    bench.timed("main", lambda: time.sleep(0.1), cached=True, save=False)  # every job read back: the time stays
    assert bench.timings["main"] >= first + 0.3


_ORPHAN_SCRIPT = """
import os, sys, time, multiprocessing
from concurrent.futures import ProcessPoolExecutor
from ppap.bench.common import exit_with_parent

def job(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(120)  # a bank's training, in small

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent, initargs=(0.1,))
    pool.submit(job, sys.argv[1])
    time.sleep(120)
"""


@pytest.mark.timeout(120)
def test_a_killed_bench_leaves_no_worker_running(tmp_path):
    """The bench's pool workers end with the bench (SIGKILL gives the pool no chance to stop them)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a reparented zombie may wait to be reaped
        except psutil.NoSuchProcess:
            return False

    script, pid_file = tmp_path / "bench_like.py", tmp_path / "worker.pid"
    script.write_text(_ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        deadline = time.time() + 90
        while not pid_file.exists():
            assert parent.poll() is None and time.time() < deadline, "the pool's worker never started its job"
            time.sleep(0.2)
        worker = psutil.Process(int(pid_file.read_text()))
        assert running(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while running(worker) and time.time() < deadline:
            time.sleep(0.1)
        alive = running(worker)
        if alive:
            worker.kill()
        assert not alive, "the worker kept running its job after the bench was killed"
    finally:
        parent.kill()
