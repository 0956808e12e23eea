"""``ppap bench search --quick`` end to end on the zoo models: every row, the compute accounting,
the ESS and twist diagnostics, the report and figure, and a re-run that recomputes nothing."""

import json

import pytest

from ppap import zoo
from ppap.fashion_mnist import fashion_mnist_dir

MODELS = ("fashion-ddpm", "fashion-classifier", "fashion-evaluator", "fashion-ppap5")


@pytest.mark.slow
@pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
@pytest.mark.skipif(not all(zoo.ZOO[n].available for n in MODELS), reason="zoo models not built in this checkout")
def test_search_bench_quick_runs_and_resumes(tmp_path, capsys):
    from ppap.bench.search import QUICK, particle_cost, particles_at
    from ppap.cli import main

    out = tmp_path / "search"
    assert main(["--threads", "1", "bench", "search", "--quick", "--quiet", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    rows, cost = r["rows"], r["cost"]
    assert {"unguided", "unguided-ddpm", "naive", "ppap"} <= set(rows)
    for method in QUICK.methods:  # every particle method at every budget it can reach, K from the measured cost
        ks = {particles_at(method, b, cost, QUICK.steps) for b in QUICK.budgets} - {0}
        assert {row["particles"] for row in rows.values() if row["method"] == method} == ks
    for row in rows.values():
        assert row["n"] == QUICK.num and 0 <= row["accuracy"] <= 1 and row["per_class_min"] <= row["accuracy"]
        if "particles" in row:
            steps = len(row["timesteps"])
            assert steps == QUICK.steps and len(row["ess_over_k"]) == steps and all(0 < e <= 1 + 1e-9 for e in row["ess_over_k"])
            assert row["compute"] == round(row["particles"] * particle_cost(row["method"], QUICK.steps, cost["guide"], cost["expert"]), 2)
            if row["method"] in ("tds", "ppap-smc", "ppap-fk"):
                assert set(row["twist_accuracy"]) == {"experts", "classifier-on-x0"}
    exact = rows[f"exact-pool{QUICK.exact_pool}-lambda1"]  # the pool's guide pass and chains, shared by the returned samples
    assert exact["compute"] == round(QUICK.exact_pool / QUICK.num * particle_cost("best-of-n", QUICK.steps, cost["guide"], 0.0), 2)
    assert all(1 - 1e-9 <= e <= QUICK.exact_pool + 1e-9 for e in exact["ess"]) and len(exact["weighted_accuracy"]) == 10
    assert rows["unguided"]["compute"] == 1.0 and rows["ppap"]["compute"] > rows["unguided"]["compute"]
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in rows) and "ESS/K" in report
    assert (out / "bench_search.png").read_bytes()[:4] == b"\x89PNG"
    kept = {f: f.stat().st_mtime_ns for f in (out / "stages").iterdir()}
    assert main(["--threads", "1", "bench", "search", "--quick", "--quiet", "--out", str(out)]) == 0
    assert {f: f.stat().st_mtime_ns for f in (out / "stages").iterdir()} == kept  # every stage read back
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_search_bench_config_file_overrides_the_defaults_and_refuses_unknown_fields(tmp_path, capsys):
    from types import SimpleNamespace

    from ppap.bench.search import SearchBenchConfig
    from ppap.cli import main
    from ppap.commands.bench import _search_config

    good = tmp_path / "small.json"
    good.write_text(json.dumps({"num": 200, "budgets": [1, 4, 16], "scales": [1.0]}))
    cfg = _search_config(SimpleNamespace(quick=False, config=str(good)))
    assert (cfg.num, cfg.budgets, cfg.scales) == (200, (1, 4, 16), (1.0,))
    good.write_text(json.dumps({"scales": {"ppap-smc": [30.0], "fk": [3.0]}}))
    assert _search_config(SimpleNamespace(quick=False, config=str(good))).scales == {"ppap-smc": [30.0], "fk": [3.0]}
    assert cfg.steps == SearchBenchConfig().steps  # the rest stays the default
    bad = tmp_path / "bad.json"
    for values, message in [
        ({"particles": 4}, "unknown field 'particles'"),
        ({"methods": ["ppap-smx"]}, "methods: unknown row 'ppap-smx'"),
        ({"gradient_rows": ["ppap-smc"]}, "gradient_rows: unknown row 'ppap-smc'"),
        ({"scales": {"ppap-smx": [3.0]}}, "scales: unknown particle method 'ppap-smx'"),
        ({"scales": [1.0, -3.0]}, "scales: lambda must be a finite number > 0, got -3.0"),
        ({"exact_scales": [0]}, "exact_scales: lambda must be a finite number > 0, got 0"),
        ({"num": 100, "exact_pool": 50}, "exact_pool: must be 0 (no exact rows) or a whole number >= num (100), got 50"),
    ]:
        bad.write_text(json.dumps(values))
        assert main(["bench", "search", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["bench", "dense", "--config", str(good), "--out", str(tmp_path / "o")]) == 2
    assert "--config applies to `ppap bench search` only" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_best_of_n_runs_at_one_lambda_the_twisted_methods_at_each():
    """Lambda does not change which particle best-of-N keeps: its budget rows run once."""
    from types import SimpleNamespace

    from ppap.bench.search import SearchBench, SearchBenchConfig

    cfg = SearchBenchConfig(budgets=(1, 4), scales=(1.0, 3.0), gradient_rows=())
    jobs = SearchBench.row_jobs(SimpleNamespace(cfg=cfg), {"guide": 0.04, "expert": 0.04})
    assert sorted(j for j in jobs if j.startswith("best-of-n")) == ["best-of-n-K1-lambda1", "best-of-n-K4-lambda1"]
    assert {"fk-K4-lambda1", "fk-K4-lambda3", "ppap-smc-K4-lambda1", "ppap-smc-K4-lambda3"} <= set(jobs)
    # lambdas per method: each method at its own, a method left out at none
    cfg = SearchBenchConfig(budgets=(4,), scales={"fk": (3.0,), "ppap-smc": (30.0, 1.0)}, gradient_rows=())
    jobs = SearchBench.row_jobs(SimpleNamespace(cfg=cfg), {"guide": 0.04, "expert": 0.04})
    assert sorted(j for j in jobs if "-K" in j) == ["fk-K4-lambda3", "ppap-smc-K4-lambda1", "ppap-smc-K4-lambda30"]


def test_a_search_run_takes_more_rows_later_but_no_other_change(tmp_path):
    """``methods``, ``gradient_rows``, ``scales`` and ``budgets`` only pick which cached rows run: a
    results folder takes rows added later (ppap-fk, another lambda); any other field is refused."""
    from dataclasses import replace

    from ppap import PPAPError
    from ppap.bench.search import QUICK, SearchBench

    def open_run(cfg):
        SearchBench.__new__(SearchBench)._open(cfg, tmp_path / "search", progress=False)

    open_run(replace(QUICK, methods=("fk",), gradient_rows=("naive",)))
    open_run(replace(QUICK, methods=("fk", "ppap-fk"), gradient_rows=("naive", "ppap"), scales=(1.0, 10.0), budgets=(1, 4)))
    with pytest.raises(PPAPError, match="another bench configuration"):
        open_run(replace(QUICK, methods=("fk", "ppap-fk"), num=QUICK.num + 1))


def test_importance_resampling_draws_by_the_tilted_weights_without_repeats():
    """Draws from a pool toward p(x) p(y | x)^lambda: one draw per class lands on pool sample i with
    probability proportional to p(y | x_i)^lambda; a class's draws never repeat a sample; a large
    lambda takes the best-scored samples."""
    import torch

    from ppap.bench.search import importance_resample

    log_prob = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]]).log()
    targets = torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0):
        counts = torch.zeros(4, 2)
        for _ in range(4000):
            picks, ess = importance_resample(log_prob, targets, scale, gen)
            counts[picks, targets] += 1
        w = (scale * log_prob).softmax(0)
        assert torch.allclose(counts / 4000, w, atol=0.03), (counts / 4000, w)
        assert torch.allclose(ess, 1 / w.double().square().sum(0))
    picks, _ = importance_resample(log_prob, torch.tensor([0, 0, 0, 0, 1, 1]), 1.0, gen)
    assert sorted(picks[:4].tolist()) == [0, 1, 2, 3] and picks[4] != picks[5]
    picks, _ = importance_resample(log_prob, torch.tensor([0, 0, 1]), 200.0, gen)
    assert sorted(picks[:2].tolist()) == [0, 3] and picks[2] == 2


def test_the_lambda_chosen_per_method_and_k_is_the_gradient_benches_rule():
    """Highest accuracy, then the lowest FID within 2 points; one lambda alone is no choice."""
    from ppap.bench.search import chosen_lambdas

    def row(method, k, lam, acc, fid):
        return {"method": method, "particles": k, "scale": lam, "accuracy": acc, "fid": fid}

    rows = [
        row("ppap-smc", 4, 10.0, 0.980, 11.5),
        row("ppap-smc", 4, 30.0, 0.987, 13.9),
        row("ppap-smc", 14, 1.0, 0.86, 13.8),  # 3 points behind: out of the FID comparison
        row("ppap-smc", 14, 3.0, 0.89, 16.0),
        row("fk", 4, 3.0, 0.68, 11.3),
    ]
    rows_by_name = {f"{r['method']}-K{r['particles']}-lambda{r['scale']:g}": r for r in rows} | {"ppap": {"accuracy": 1.0, "fid": 1.0}}
    assert chosen_lambdas(rows_by_name) == {"ppap-smc-K4": 10.0, "ppap-smc-K14": 3.0}
