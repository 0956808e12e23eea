"""How low can a data-free guide's FID go? (issue #13, the FID criterion)

A data-free expert learns from the diffusion model's own samples, labelled by the off-the-shelf
teacher; the best it can do is pick, for each requested class, the DDPM's own images of that
class. So the DDPM's samples, class-balanced by a label, are the data-free floor of FID: with the
teacher's labels (what the corpus holds, no real label) and with the independent evaluator's
(an oracle choice). Beside them, every saved main-table row of a ``ppap bench classifier`` run
is re-scored with the same features, so the floor and the rows are one comparison.

    python benchmarks/fid_floor.py --bench runs/bench-classifier --corpus runs/corpus/fashion-ddpm-4000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ppap.corpus import load_corpus
from ppap.fashion_mnist import load_fashion_mnist
from ppap.images import uint8_to_unit
from ppap.io import PPAPError, atomic_write_json
from ppap.loading import load_guide
from ppap.metrics import features, fid, precision_recall, predict


def balanced(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices of the first ``per_class`` images of every class under ``labels``."""
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise PPAPError(f"only {len(idx)} images of class {c} in the corpus, {per_class} wanted")
        picks.append(idx[:per_class])
    return torch.cat(picks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default="runs/bench-classifier", help="a ppap bench classifier folder (its samples/*.npz)")
    p.add_argument("--corpus", default="runs/corpus/fashion-ddpm-4000", help="the data-free corpus the experts learned from")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--out", default="runs/fid_floor.json")
    args = p.parse_args()

    evaluator, teacher = load_guide("fashion-evaluator").net, load_guide("fashion-classifier").net
    test, _ = load_fashion_mnist("test")
    real = features(evaluator, test)
    k = 10
    rows: dict[str, dict] = {}

    def score(name: str, x: torch.Tensor, note: str) -> None:
        f = features(evaluator, x)
        prec, rec = precision_recall(real[: len(x)], f)
        rows[name] = {"n": len(x), "fid": fid(f, real), "precision": prec, "recall": rec, "note": note}
        print(f"| {name} | {len(x)} | {rows[name]['fid']:.2f} | {prec:.2f} | {rec:.2f} | {note} |", flush=True)

    print("| images | n | FID | precision | recall | how chosen |\n|---|---|---|---|---|---|")
    train_x, train_y = load_fashion_mnist("train")
    score("real training images", train_x[balanced(train_y, args.per_class, k)], "100 per class by the true label")

    x = load_corpus(args.corpus)
    n = k * args.per_class
    score("DDPM samples as drawn", x[:n], f"the corpus's first {n}")
    by_teacher = predict(teacher, x).argmax(-1)
    score(
        "DDPM samples, balanced by the teacher", x[balanced(by_teacher, args.per_class, k)], "off-the-shelf classifier's labels (data-free)"
    )
    by_judge = predict(evaluator, x).argmax(-1)
    score("DDPM samples, balanced by the evaluator", x[balanced(by_judge, args.per_class, k)], "the judge's own labels (oracle)")
    shares = torch.bincount(by_teacher, minlength=k).float() / len(x)

    for npz in sorted(Path(args.bench, "samples").glob("*.npz")):
        images = torch.from_numpy(np.load(npz)["images"]).permute(0, 3, 1, 2)
        score(npz.stem, uint8_to_unit(images), "main-table row, as sampled")
    atomic_write_json(Path(args.out), {"rows": rows, "corpus": args.corpus, "teacher_shares": shares.tolist()})


if __name__ == "__main__":
    main()
