"""Judge the .npz of a classifier-guided ``ppap sample`` run with the independent evaluator:
accuracy on the requested class, per class, and each class's most common miss; with ``--fid``,
also FID, precision and recall in the evaluator's features against the 10,000 real test images.

    ppap sample --diffusion fashion-ddpm --guide fashion-classifier --experts fashion-ppap5 \\
        --method ppap --target all --num 500 --out runs/zoo-check/ppap5.png
    python examples/judge.py runs/zoo-check/ppap5.npz

Colour images (``fashion-rgb-ddpm``'s) are judged by ``fashion-rgb-evaluator``; ``--colour red``
also gives the share whose garment is nearest to the prompt's colour (``fashion_rgb.colour_fidelity``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ppap.fashion_mnist import FASHION_MNIST_CLASSES
from ppap.loading import load_guide
from ppap.metrics import features, fid, precision_recall, predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npz")
    p.add_argument("--evaluator", help="default: fashion-evaluator, or fashion-rgb-evaluator for colour images")
    p.add_argument("--colour", help="colour images: the prompt's colour (e.g. red), for colour fidelity")
    p.add_argument("--fid", action="store_true", help="also FID / precision / recall vs the real test set (needs Fashion-MNIST)")
    args = p.parse_args()
    data = np.load(args.npz)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 NHWC -> [-1, 1] NCHW
    requested = torch.from_numpy(data["targets"]).long()
    rgb = images.shape[1] == 3
    if requested.ndim == 3:  # a segmentation run: [N, H, W] label maps as targets
        judge_layouts(images, requested, args, rgb)
        return
    if rgb:
        from ppap.bench.rgb import load_evaluator

        evaluator = load_evaluator(args.evaluator or "fashion-rgb-evaluator")
    else:
        evaluator = load_guide(args.evaluator or "fashion-evaluator").net
    judged = predict(evaluator, images).argmax(-1)
    k = len(FASHION_MNIST_CLASSES)
    confusion = torch.zeros(k, k, dtype=torch.long)  # [requested, judged]
    for r, j in zip(requested.tolist(), judged.tolist()):
        confusion[r, j] += 1
    per_class = confusion.diag().float() / confusion.sum(1).clamp_min(1)
    asked = confusion.sum(1) > 0  # the classes requested at least once
    print(
        f"{len(images)} images: {(judged == requested).float().mean().item():.1%} judged the requested class; worst class {per_class[asked].min().item():.0%}"
    )
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        if not asked[c]:
            continue
        row = confusion[c].clone()
        row[c] = -1
        miss = f"{FASHION_MNIST_CLASSES[int(row.argmax())]} ({int(row.max())})" if row.max() > 0 else "-"
        print(f"| {name} | {per_class[c].item():.0%} | {miss} |")
    report_colours(images, args, rgb)
    if args.fid:
        if rgb:
            from ppap.fashion_rgb import load_fashion_rgb

            real_images = load_fashion_rgb("test").images()
        else:
            from ppap.fashion_mnist import load_fashion_mnist

            real_images = load_fashion_mnist("test")[0]
        real, fake = features(evaluator, real_images), features(evaluator, images)
        precision, recall = precision_recall(real[: len(fake)], fake)  # as the bench: equal set sizes
        print(
            f"FID {fid(fake, real):.2f}, precision {precision:.2f}, recall {recall:.2f} (FID vs the 10,000 test images, biased up at small n; precision / recall vs as many)"
        )


def report_colours(images: torch.Tensor, args, rgb: bool) -> None:
    """Colour images: how many garments are nearest each colour, and the share in ``--colour``."""
    if not rgb:
        return
    from ppap.fashion_rgb import COLOUR_NAMES, nearest_colour

    seen = torch.bincount(nearest_colour(images) + 1, minlength=len(COLOUR_NAMES) + 1)[1:]
    print("nearest colours: " + ", ".join(f"{name} {int(n)}" for name, n in zip(COLOUR_NAMES, seen) if n))
    if args.colour:
        print(f"colour fidelity ({args.colour}): {seen[COLOUR_NAMES.index(args.colour)].item() / len(images):.1%}")


def judge_layouts(images: torch.Tensor, maps: torch.Tensor, args, rgb: bool) -> None:
    """A segmentation-guided run: the foreground IoU of each sample's garment pixels with its
    target map's foreground, and whether the evaluator sees the class the map implies."""
    from ppap.bench.dense import segmentation_scores
    from ppap.fashion_rgb import garment_mask

    if rgb:
        from ppap.bench.rgb import load_evaluator

        evaluator = load_evaluator(args.evaluator or "fashion-rgb-evaluator")
        scores = segmentation_scores(images, maps, evaluator, foreground=garment_mask)
    else:
        evaluator = load_guide(args.evaluator or "fashion-evaluator").net
        scores = segmentation_scores(images, maps, evaluator)
    iou = torch.tensor(scores["iou"])
    print(
        f"{len(images)} images: foreground IoU with the target map {iou.mean():.3f} (min {iou.min():.2f}); "
        f"the evaluator sees the map's class in {torch.tensor(scores['class_hit']).mean():.1%}"
    )
    report_colours(images, args, rgb)


if __name__ == "__main__":
    main()
