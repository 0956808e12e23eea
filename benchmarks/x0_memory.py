"""Peak memory of x0 guidance at a real size, with its UNet backward on the whole batch or in
sub-batches (``GuidanceTerm.max_batch``), on the random-weight models ``ppap bench scale`` built.
Each setting runs in its own fresh process (two mid-noise DDIM-25 steps, as the bench's memory
stage); a setting that does not fit is reported as killed.

    python benchmarks/x0_memory.py --pair ddpm-celebahq-256+segformer-b0-ade-512 --batch 8 --max-batch 8,2,1
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ppap.bench.common import in_fresh_process
from ppap.bench.scale_measurements import _load, _memory_of


def x0_memory(diffusion_dir: str, guide_dir: str, batch: int, max_batch: int) -> dict:
    loaded = _load(diffusion_dir, guide_dir, None, "cpu", "float32", batch)
    term = dataclasses.replace(loaded.term("x0"), max_batch=max_batch)
    loaded.guide_fn = lambda method: term.build(loaded.denoiser)  # type: ignore[method-assign]
    return _memory_of(loaded, 25, "x0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/bench-scale", help="the bench folder (its models/ are reused)")
    p.add_argument("--pair", required=True, help="DIFFUSION+GUIDE, as in the bench's report")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-batch", default="8,2,1", help="sub-batch sizes to measure, comma-separated")
    args = p.parse_args()
    diffusion, guide = args.pair.split("+")
    models = Path(args.runs) / "models"
    print("| batch | x0 sub-batch | peak MiB | step MiB (above the loaded models) |\n|---|---|---|---|")
    for m in (int(v) for v in args.max_batch.split(",")):
        try:
            r = in_fresh_process(x0_memory, str(models / diffusion), str(models / guide), args.batch, m)
            print(f"| {args.batch} | {m} | {r['peak_mib']:.0f} | {r['step_mib']:.0f} |", flush=True)
        except Exception as e:  # killed for memory: reported, the next setting still runs
            print(f"| {args.batch} | {m} | {e} | |", flush=True)


if __name__ == "__main__":
    main()
