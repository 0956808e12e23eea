"""Noise-vs-accuracy (PPAP Sec. 3): accuracy on real test images noised to t, for the
off-the-shelf classifier, the routed experts, and each expert applied at every t.

    python benchmarks/noise_accuracy.py --experts fashion-ppap5 --out runs/noise_accuracy.json
"""

from __future__ import annotations

import argparse
import json

from ppap.data import load_fashion_mnist
from ppap.metrics import accuracy_under_noise
from ppap.pipeline import load_bank, load_diffusion, load_guide


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", default="fashion-ppap5")
    p.add_argument("--out", default="runs/noise_accuracy.json")
    args = p.parse_args()
    diffusion = load_diffusion("fashion-ddpm")
    x, y = load_fashion_mnist("test")
    guide = load_guide("fashion-classifier")
    bank, _ = load_bank(args.experts, load_guide("fashion-classifier"), diffusion)
    ts = list(range(0, 1000, 100))
    rows = {"off-the-shelf": accuracy_under_noise(lambda v, t: guide.net(v), diffusion.schedule, x, y, ts),
            "experts (routed)": accuracy_under_noise(bank, diffusion.schedule, x, y, ts)}
    for i in range(bank.router.num_experts):
        rows[f"expert_{i} at every t"] = accuracy_under_noise(lambda v, t, i=i: bank.run_expert(i, v), diffusion.schedule, x, y, ts)
    for name, accs in rows.items():
        print(f"{name:24s}", " ".join(f"{a:.3f}" for a in accs.values()))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
