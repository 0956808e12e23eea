"""Quality of fashion-ddpm in evaluator features: class histogram of unguided samples (every
class should be >= 4%), FID/KID/precision/recall of N DDIM samples against the 10k test set,
next to the same figures for 10k real training images (the floor).

    python examples/ddpm_quality.py --num 1000 --out runs/ddpm_quality.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ppap.batch_sampling import sample_images
from ppap.fashion_mnist import load_fashion_mnist
from ppap.loading import load_guide, load_pipeline
from ppap.metrics import features, fid, kid, precision_recall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--out", default="runs/ddpm_quality.json")
    args = p.parse_args()
    evaluator = load_guide("fashion-evaluator").net
    x_test, _ = load_fashion_mnist("test")
    x_train, _ = load_fashion_mnist("train")
    f_test = features(evaluator, x_test)
    t0 = time.time()
    x = sample_images(
        load_pipeline("fashion-ddpm", device="cpu"),
        args.num,
        seed=args.seed,
        batch_size=100,
        num_inference_steps=args.steps,
        sampler="ddim",
    )
    seconds = time.time() - t0
    f_gen = features(evaluator, x)
    f_real = features(evaluator, x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:10000]])
    with torch.no_grad():
        hist = torch.bincount(evaluator(x).argmax(-1), minlength=10).float() / len(x)
    n = min(args.num, 10000)
    pr_gen = precision_recall(f_test[:n], f_gen[:n])
    pr_real = precision_recall(f_test[:n], f_real[:n])
    row = {
        "num": args.num,
        "steps": args.steps,
        "sampling_seconds": round(seconds, 1),
        "class_histogram": [round(v, 4) for v in hist.tolist()],
        "min_class_fraction": hist.min().item(),
        "fid_generated_vs_test": fid(f_gen, f_test),
        "fid_real_train10k_vs_test": fid(f_real, f_test),
        "kid_generated_vs_test": kid(f_gen, f_test),
        "kid_real_train10k_vs_test": kid(f_real, f_test),
        "precision_recall_generated": pr_gen,
        "precision_recall_real": pr_real,
    }
    print(json.dumps(row, indent=1))
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
