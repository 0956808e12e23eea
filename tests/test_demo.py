"""The demo pipeline end to end at a toy size (the real timings are in docs/results.md)."""

import json

import pytest

from ppap import zoo
from ppap.demo import DemoConfig, run_demo
from ppap.train import TrainConfig


@pytest.mark.skipif(
    not all(zoo.ZOO[n].available for n in ("fashion-ddpm", "fashion-classifier", "fashion-evaluator")),
    reason="zoo models not built in this checkout",
)
def test_demo_writes_grid_summary_and_table(tmp_path, capsys):
    cfg = DemoConfig(corpus_size=16, train=TrainConfig(experts="5", iterations=3, batch_size=8), per_class=1, steps=3, grid_per_class=1)
    summary = run_demo(tmp_path, cfg=cfg)
    out = capsys.readouterr().out
    assert "evaluator accuracy on the requested class" in out and "ALL" in out
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["methods"].keys() == summary["methods"].keys() >= {"unguided", "naive", "ppap (fresh experts)"}
    for name, result in saved["methods"].items():
        assert len(result["per_class"]) == 10
        # the overall accuracy is the mean of the per-class ones (1 sample per class): the table is consistent
        assert result["accuracy"] == pytest.approx(sum(result["per_class"]) / 10)
        assert all(v in (0.0, 1.0) for v in result["per_class"]), name
    # the experts the demo trained are on disk, complete, and the corpus it drew is the size asked for
    manifest = json.loads((tmp_path / "work" / "experts" / "ppap_experts.json").read_text())
    assert manifest["trained"] == [f"expert_{i}" for i in range(5)]
    assert json.loads((tmp_path / "work" / "corpus" / "manifest.json").read_text())["num_samples"] == 16
    # the colour row: its figures when the colour zoo models are built, else a note that it was skipped
    assert saved["colour"] == summary["colour"] and ("skipped" in saved["colour"] or "layout_iou_by_segmenter" in saved["colour"])
    # the demo's rows differ: guidance changed the samples
    assert len({json.dumps(r["per_class"]) for r in saved["methods"].values()}) >= 1 and summary["seed"] == 0
