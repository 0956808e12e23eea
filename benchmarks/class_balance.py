"""Where PPAP's per-class gap comes from (issue #13, step 1), measured on the zoo:
* the class balance of the DDPM's own samples (what the data-free corpus holds) under the
  off-the-shelf teacher's pseudo-labels and under the independent judge;
* per-class accuracy of PPAP-guided samples (`--target all`) by the judge, and what the misses
  are judged to be (the confusion of requested vs judged class), against the unguided samples.

  python benchmarks/class_balance.py --num 500 --experts fashion-ppap5 --out runs/class_balance.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from ppap.batch_sampling import sample_images
from ppap.fashion_mnist import FASHION_MNIST_CLASSES
from ppap.io import atomic_write_json
from ppap.loading import load_experts, load_guide, load_pipeline


def _labels(net, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(x[k : k + 250]).argmax(-1) for k in range(0, len(x), 250)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--experts", default="fashion-ppap5")
    p.add_argument("--scale", type=float, default=None, help="default: the bank's measured best")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="runs/class_balance.json")
    args = p.parse_args()
    pipe = load_pipeline("fashion-ddpm", device="cpu")
    teacher, judge = load_guide("fashion-classifier"), load_guide("fashion-evaluator")
    bank = load_experts(args.experts, copy.deepcopy(teacher), pipe.diffusion)
    common = dict(seed=args.seed, batch_size=64, num_inference_steps=25, sampler="ddim")
    unguided = sample_images(pipe, args.num, desc="unguided", **common)
    term = pipe.guidance_term(args.num, guide=teacher, experts=bank, target="all", classifier_scale=args.scale)
    guided = sample_images(pipe, args.num, terms=[term], desc="ppap", **common)
    k = len(FASHION_MNIST_CLASSES)
    by_teacher, by_judge = _labels(teacher, unguided), _labels(judge, unguided)
    judged, requested = _labels(judge, guided), term.targets
    confusion = torch.zeros(k, k, dtype=torch.long)  # [requested, judged]
    for r, j in zip(requested.tolist(), judged.tolist()):
        confusion[r, j] += 1
    result = {
        "num": args.num,
        "experts": args.experts,
        "scale": term.scale,
        "classes": list(FASHION_MNIST_CLASSES),
        "unguided_share_by_teacher": (torch.bincount(by_teacher, minlength=k).float() / args.num).tolist(),
        "unguided_share_by_judge": (torch.bincount(by_judge, minlength=k).float() / args.num).tolist(),
        "teacher_judge_agreement_unguided": (by_teacher == by_judge).float().mean().item(),
        "guided_accuracy": (judged == requested).float().mean().item(),
        "guided_per_class": [(confusion[c, c] / confusion[c].sum().clamp_min(1)).item() for c in range(k)],
        "guided_confusion": confusion.tolist(),
    }
    atomic_write_json(Path(args.out), result)
    print(
        f"guided accuracy {result['guided_accuracy']:.1%} (scale {term.scale:g}); teacher/judge agreement on unguided "
        f"samples {result['teacher_judge_agreement_unguided']:.1%}"
    )
    print(f"{'class':<12}{'unguided (teacher)':>20}{'unguided (judge)':>18}{'guided acc.':>13}  most common miss")
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        row = confusion[c].clone()
        row[c] = -1
        miss = FASHION_MNIST_CLASSES[int(row.argmax())] if row.max() > 0 else "-"
        print(
            f"{name[:12]:<12}{result['unguided_share_by_teacher'][c]:>20.1%}{result['unguided_share_by_judge'][c]:>18.1%}"
            f"{result['guided_per_class'][c]:>13.1%}  {miss} ({int(row.max().clamp_min(0))})"
        )


if __name__ == "__main__":
    main()
