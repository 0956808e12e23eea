"""Noise vs accuracy (PPAP Sec. 3) for any zoo expert bank: the off-the-shelf model, the routed
experts and each expert at every t, on real test images noised to t (the same noise for every t).
The figure is the guide's own card metric against the *clean* image's ground truth:
accuracy (classifier), mIoU (segmenter), L1 to the analytic Sobel map (edge estimator).

    python examples/noise_accuracy.py --experts fashion-ppap5 --out runs/noise_accuracy.json
    python examples/noise_accuracy.py --experts fashion-segmenter-ppap5 --num 2000
"""

from __future__ import annotations

import argparse
import copy
import json

from ppap import zoo
from ppap.fashion_mnist import load_fashion_mnist
from ppap.loading import load_diffusion, load_experts, load_guide
from ppap.metrics import mean_iou, score_under_noise
from ppap.models import segmentation_labels, sobel_magnitude


def card_metric(task: str, x, y):
    """The guide's card metric of its outputs on x_t, against the ground truth of the clean x."""
    if task == "classification":
        return lambda logits: (logits.argmax(-1) == y).float().mean().item()
    if task == "segmentation":
        labels = segmentation_labels(x, y)
        return lambda logits: mean_iou(logits.argmax(1), labels, logits.shape[1])
    edges = sobel_magnitude(x)
    return lambda maps: (maps - edges).abs().mean().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", default="fashion-ppap5", choices=[n for n, e in zoo.ZOO.items() if e.kind == "experts"])
    p.add_argument("--num", type=int, default=10000, help="test images (the first N)")
    p.add_argument("--out", default="runs/noise_accuracy.json")
    args = p.parse_args()
    entry = zoo.ZOO[args.experts]
    diffusion = load_diffusion("fashion-ddpm")
    x, y = load_fashion_mnist("test")
    x, y = x[: args.num], y[: args.num]
    guide = load_guide(entry.guide)
    bank = load_experts(args.experts, copy.deepcopy(guide), diffusion)  # the adapters go into the copy: guide stays clean
    ts = list(range(0, 1000, 100))

    def measure(model):
        return score_under_noise(model, diffusion.schedule, x, ts, card_metric(entry.task, x, y))

    rows = {"off-the-shelf": measure(lambda v, t: guide(v)), "experts (routed)": measure(bank)}
    for i in range(bank.router.num_experts):
        rows[f"expert_{i} at every t"] = measure(lambda v, t, i=i: bank.run_expert(i, v))
    metric = {"classification": "accuracy", "segmentation": "mIoU", "dense": "L1 to Sobel (lower is better)"}[entry.task]
    print(f"{args.experts}: {metric} at t = {ts}")
    for name, values in rows.items():
        print(f"{name:24s}", " ".join(f"{v:.3f}" for v in values.values()))
    with open(args.out, "w") as f:
        json.dump({"experts": args.experts, "metric": metric, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
