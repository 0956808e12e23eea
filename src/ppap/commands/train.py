"""``ppap train``: noise-range experts for an off-the-shelf guide, on a corpus or Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import json

from ..cli import config_from_args
from ..errors import PPAPError
from .common import accelerator, check_out


def _load_training_data(args, task_name: str):
    from ..corpus import load_corpus
    from ..fashion_mnist import load_fashion_mnist

    if args.limit is not None and args.limit < 1:
        raise PPAPError(f"--limit must be >= 1, got {args.limit}")
    if args.data == "fashion-mnist":
        x, y = load_fashion_mnist("train", args.data_dir)
        return (x[: args.limit], y[: args.limit]) if args.limit else (x, y)
    return load_corpus(args.data, limit=args.limit), None


def cmd_train(args) -> int:
    from ..bank_format import parameter_report
    from ..banks import make_bank
    from ..config import TrainConfig
    from ..loading import load_diffusion, load_guide, resolve_device
    from ..router import TimestepRouter
    from ..tasks import task_for
    from ..train import train_experts

    cfg = config_from_args(TrainConfig, args)
    check_out(args.out)
    if args.limit is not None and args.limit < 1:
        raise PPAPError(f"--limit must be >= 1, got {args.limit}")
    acc = accelerator()
    device = resolve_device(args.device) if args.device else acc.device
    diffusion = load_diffusion(args.diffusion, revision=args.revision)  # its schedule and image shape; the UNet is not run
    schedule, image_shape = diffusion.schedule, diffusion.image_shape
    guide = load_guide(args.guide, args.guide_weights, task=args.task, revision=args.revision).to(device)
    task = task_for(guide, image_shape, args.task or guide.task or "classification", tau=cfg.tau)
    router = TimestepRouter.parse(cfg.experts, schedule.num_train_timesteps, schedule.alphas_cumprod)
    if args.dry_run:
        print(
            json.dumps(
                {"train": dataclasses.asdict(cfg), "task": dataclasses.asdict(task), "boundaries": list(router.boundaries)}, indent=2
            )
        )
        return 0
    images, labels = _load_training_data(args, task.name)
    if images.shape[1:] != image_shape:
        raise PPAPError(f"training images have shape {list(images.shape[1:])} but the diffusion model makes {list(image_shape)}")
    bank = make_bank(guide, router, cfg.adapter_config(), seed=cfg.seed)
    if acc.is_main_process and not args.quiet:
        rep = parameter_report(bank)
        print(
            f"{rep['num_experts']} {cfg.adapter} experts, {rep['trainable_per_expert']:,} trainable parameters each "
            f"({rep['fraction_per_expert']:.2%} of the {rep['backbone_parameters']:,}-parameter backbone)"
        )
        if getattr(bank, "skipped", None):
            print(f"left frozen (peft cannot adapt them at rank {cfg.rank}): {', '.join(bank.skipped)}")
    stats = train_experts(
        bank,
        task,
        schedule,
        images,
        cfg,
        args.out,
        labels=labels,
        identity={"ref": guide.ref},  # a hub id with the revision it was loaded at
        accelerator=acc if acc.num_processes > 1 else None,
        progress=not args.quiet,
    )
    if acc.is_main_process and not args.quiet:
        for name, s in stats.items():
            print(f"{name} t∈[{s['range'][0]},{s['range'][1]}): loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} ({s['seconds']} s)")
        print(f"experts saved in {args.out}")
    return 0
