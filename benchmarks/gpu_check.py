"""``make gpu-check``: everything a GPU should confirm, in one command, its figures in one file.

1. the device and dtype tests on CUDA (pytest ``-k`` on device / dtype / float16 / bfloat16 /
   cuda / offload test names, with ``PPAP_TEST_DEVICE=cuda`` for the tests that take a device);
2. ``ppap bench scale`` on the GPU in float32, float16 and bfloat16 at batch 1, 16 and 64
   (the model folders are built once and shared by the three runs);
3. the zoo's sampling throughput: ``ppap sample --diffusion fashion-ddpm --guide
   fashion-classifier --experts fashion-ppap5 --num 1024 --device cuda`` timed (images per
   second, start-up included), and one guided step at batch 64 for naive / PPAP / x0.

Without CUDA it stops at once with one line (exit 2). ``--cpu-smoke`` runs every part on the
CPU at toy sizes instead (to check that the command itself works on a machine without a GPU).

    python benchmarks/gpu_check.py --out docs/gpu-check.json
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu-check-smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ppap.io import atomic_write_json

TEST_SELECTION = "device or dtype or float16 or bfloat16 or cuda or offload"
TESTS = Path(__file__).resolve().parents[1] / "tests"
ZOO = ("fashion-ddpm", "fashion-classifier", "fashion-ppap5")


def run(cmd: list[str], env: dict | None = None) -> tuple[int, float, str]:
    """(exit status, seconds, last lines of the output) of ``cmd``, its output also shown."""
    t0 = time.time()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-2000:])
    return proc.returncode, round(time.time() - t0, 1), (proc.stdout + proc.stderr)[-600:]


def device_tests(smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", TEST_SELECTION, str(TESTS)]
    if smoke:
        cmd.append("--collect-only")  # the selection only: the tests themselves run in make test
    code, seconds, tail = run(cmd, env={"PPAP_TEST_DEVICE": "cpu" if smoke else "cuda"})
    return {
        "command": " ".join(cmd[1:]),
        "exit_status": code,
        "seconds": seconds,
        "summary": tail.strip().splitlines()[-1] if tail.strip() else "",
    }


def scale_run(root: Path, device: str, dtype: str, smoke: bool) -> dict:
    """``ppap bench scale`` in one dtype; the model folders are shared by the dtypes' runs."""
    models = root / "models"
    folder = root / f"scale-{dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    if not (folder / "models").exists():
        (folder / "models").symlink_to(models.resolve(), target_is_directory=True)
    cmd = [sys.executable, "-m", "ppap", "bench", "scale", "--device", device, "--dtype", dtype, "--out", str(folder), "--quiet"]
    cmd += ["--quick"] if smoke else ["--batch-sizes", "1,16,64"]
    code, seconds, tail = run(cmd)
    entry: dict = {"command": " ".join(cmd[1:]), "exit_status": code, "seconds": seconds}
    results = folder / "results.json"
    if code == 0 and results.exists():
        r = json.loads(results.read_text())
        entry |= {"targets": r["targets"], "errors": r["errors"], "report": str(folder / "report.md")}
        entry["steps"] = {
            pair: {f"b{b}": (p.get(f"b{b}") or {}).get("seconds") for b in r["batch_sizes"]} for pair, p in r["pairs"].items()
        }
        entry["peak_mib"] = {
            pair: {
                f"b{b}": {m: (v or {}).get("peak_mib") for m, v in ((p.get(f"b{b}") or {}).get("memory") or {}).items()}
                for b in r["batch_sizes"]
            }
            for pair, p in r["pairs"].items()
        }
        entry["throughput"] = r["throughput"]
    else:
        entry["output"] = tail
    return entry


def zoo_throughput(root: Path, device: str, smoke: bool) -> dict:
    num, batch = (8, 8) if smoke else (1024, 256)
    diffusion, guide, experts = ZOO
    cmd = [sys.executable, "-m", "ppap", "sample", "--diffusion", diffusion, "--guide", guide, "--experts", experts]
    cmd += ["--num", str(num), "--batch-size", str(batch), "--device", device, "--out", str(root / "zoo-samples.png"), "--quiet"]
    code, seconds, tail = run(cmd)
    return {
        "command": " ".join(cmd[1:]),
        "exit_status": code,
        "seconds": seconds,
        "images_per_s": round(num / seconds, 2) if code == 0 else None,
    }


def zoo_guided_step(device: str, smoke: bool) -> dict:
    """One mid-noise DDIM-25 step at batch 64 per method and its parts (ppap.bench.scale_measurements)."""
    from ppap.bench.scale_measurements import measure_times

    batch, repeats = (2, 1) if smoke else (64, 10)
    seconds = measure_times(*ZOO, device, "float32", batch, 25, repeats)
    naive = seconds["naive"]
    return {"batch": batch, "repeats": repeats, "seconds": seconds} | {
        f"{m}_over_naive": round(seconds[m] / naive, 3) for m in ("ppap", "x0")
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/gpu-check.json", help="the JSON file the figures go to")
    p.add_argument("--work", default="runs/gpu-check", help="folder for the bench runs and samples")
    p.add_argument("--cpu-smoke", action="store_true", help="every part on the CPU at toy sizes (checks the command, not a GPU)")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "make gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.cpu_smoke else "cuda"
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    figures: dict = {
        "command": "make gpu-check" if not args.cpu_smoke else "python benchmarks/gpu_check.py --cpu-smoke",
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    out = Path(args.out)
    dtypes = ("float32",) if args.cpu_smoke else ("float32", "float16", "bfloat16")
    parts = [
        (("tests",), lambda: device_tests(args.cpu_smoke)),
        (("zoo_sampling",), lambda: zoo_throughput(root, device, args.cpu_smoke)),
        (("zoo_guided_step",), lambda: zoo_guided_step(device, args.cpu_smoke)),
    ] + [(("scale", d), lambda d=d: scale_run(root, device, d, args.cpu_smoke)) for d in dtypes]
    figures["scale"] = {}
    for i, (key, part) in enumerate(parts):  # the figures so far are on disk after each part: a run cut short keeps them
        (figures if len(key) == 1 else figures["scale"])[key[-1]] = part()
        figures["seconds"] = round(time.time() - t0, 1)
        figures["complete"] = i == len(parts) - 1
        atomic_write_json(out, figures)
    print(f"gpu-check: figures in {args.out} ({figures['seconds']} s)")
    failed = [k for k in ("tests", "zoo_sampling") if figures[k]["exit_status"] != 0]
    failed += [f"scale {d}" for d, e in figures["scale"].items() if e["exit_status"] != 0]
    if failed:
        print(f"gpu-check: failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
