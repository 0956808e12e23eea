"""Does the classifier's winning recipe (LoRA rank 32, warm-started chain) help the dense experts?
For each dense zoo recipe (``fashion-segmenter-ppap5``, ``fashion-edges-ppap5``) this trains two
banks that differ only there (everything else as the zoo's: steps, batch, lr, loss, the shared
4,000-image corpus): rank 8 with cold starts (the zoo's banks until 2026-12-02) and rank 32 with
a warm-started chain (the zoo's since), then scores both as ``ppap bench dense`` scores its PPAP
row, side by side in one run: each bank's scale the best of the bench's sweep (its sweep targets
and seed), then the main table's 500 targets and initial noises.

    python benchmarks/dense_recipe.py --out runs/dense-recipe        # resumable; writes report.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from ppap.bank_format import load_manifest
from ppap.bench.dense import TASKS, DenseBench, DenseBenchConfig
from ppap.io import atomic_write_bytes, atomic_write_json
from ppap.loading import load_experts, load_guide
from ppap.recipes import EXPERT_RECIPES, shared_corpus_dir
from ppap.train import data_free_experts

VARIANTS = {
    "rank 8, cold start": dict(rank=8, alpha=8, warm_start=False),
    "rank 32, warm-started chain": dict(rank=32, alpha=32, warm_start=True),
}


def train_bank(bench: DenseBench, experts_ref: str, variant: dict, work_dir: Path) -> tuple[Path, float]:
    """The zoo recipe ``experts_ref`` with ``variant``'s changes, trained (or read back) in
    ``work_dir``: its experts folder and its experts' training seconds."""
    r = EXPERT_RECIPES[experts_ref]
    cfg = dataclasses.replace(r.train, **variant)
    corpus = shared_corpus_dir(Path("runs/zoo"), r.diffusion, r.corpus_size)  # the zoo's own corpus
    data_free_experts(
        bench.pipe, r.diffusion, load_guide(r.guide), work_dir, corpus_size=r.corpus_size, cfg=cfg, task_name=r.task, corpus_dir=corpus
    )
    stats = load_manifest(work_dir / "experts")["stats"]  # every expert's, also those a resumed call read back
    return work_dir / "experts", round(sum(s["seconds"] for s in stats.values()), 1)


def score_bank(bench: DenseBench, task_name: str, bank_dir: str | Path, name: str) -> dict:
    guide = bench.models[task_name][0]
    bench.models[task_name] = (guide, load_experts(bank_dir, copy.deepcopy(guide), bench.diffusion))

    def compute() -> dict:
        sweep = bench.sweep_method(task_name, "ppap", bench.targets(task_name, bench.references(sweep=True)))
        best = max(sweep, key=lambda p: bench.key_metric(task_name, p))["scale"]
        return {"sweep": sweep, "main": bench.main_row(task_name, "ppap", best)}

    return bench.stage.get(f"{task_name}-{name}", compute)


def report(results: dict) -> str:
    lines = []
    for task_name, banks in results.items():
        seg = task_name == "segmentation"
        cols = ("foreground IoU", "evaluator acc.") if seg else ("Sobel L1", "Sobel r")
        keys = ("iou", "class_hit") if seg else ("l1", "pearson")
        lines += [f"{task_name}:", "", f"| bank | scale | {cols[0]} | {cols[1]} | FID | train s |", "|---|---|---|---|---|---|"]
        for name, r in banks.items():
            m = r["main"]
            lines.append(
                f"| {name} | {m['scale']:g} | {m[keys[0]]:.3f} | {m[keys[1]]:.3f} | {m['fid']:.2f} | {r.get('train_seconds', '-')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/dense-recipe")
    args = p.parse_args()
    out = Path(args.out)
    bench = DenseBench(DenseBenchConfig(), out)
    results: dict = {}
    for task_name, (_, experts_ref) in TASKS.items():
        results[task_name] = {}
        for name, variant in VARIANTS.items():
            tag = f"r{variant['rank']}-{'warm' if variant['warm_start'] else 'cold'}"
            bank_dir, seconds = train_bank(bench, experts_ref, variant, out / f"{experts_ref}-{tag}")
            results[task_name][name] = score_bank(bench, task_name, bank_dir, tag) | {"train_seconds": seconds}
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", report(results).encode())
    print(report(results))


if __name__ == "__main__":
    main()
