"""`accelerate launch --multi_gpu --num_processes 2 -m ppap ...` on CPU: two gloo processes."""

import os
import subprocess
import sys

import numpy as np
from safetensors.torch import load_file

from ppap.cli import main


def _launch(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ppap",
        "--threads",
        "1",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_two_process_generate_and_train_match_one_process(tiny_models, tmp_path):
    m = tiny_models
    gen = ["generate", "--diffusion", m["diffusion"], "--num", "40", "--shard-size", "8", "--steps", "3", "--quiet"]
    _launch(*gen, "--out", str(tmp_path / "c2"))
    assert main(["--threads", "1", *gen, "--out", str(tmp_path / "c1")]) == 0
    shards = sorted(p.name for p in (tmp_path / "c2").glob("shard-*.npy"))
    assert shards == [f"shard-{k:05d}.npy" for k in range(5)]
    for name in shards:  # each rank wrote disjoint shards; together exactly the one-process corpus
        assert np.array_equal(np.load(tmp_path / "c2" / name), np.load(tmp_path / "c1" / name))

    # frozen norms: then the data-parallel gradient equals the full-batch one, so weights must match
    train = [
        "train",
        "--diffusion",
        m["diffusion"],
        "--guide",
        m["guide"],
        "--guide-weights",
        m["weights"],
        "--data",
        str(tmp_path / "c1"),
        "--experts",
        "2",
        "--iterations",
        "8",
        "--batch-size",
        "8",
        "--per-expert-norm",
        "false",
        "--quiet",
    ]
    _launch(*train, "--out", str(tmp_path / "e2"))
    assert main(["--threads", "1", *train, "--out", str(tmp_path / "e1")]) == 0
    for i in range(2):
        one = load_file(str(tmp_path / "e1" / f"expert_{i}" / "adapter_model.safetensors"))
        two = load_file(str(tmp_path / "e2" / f"expert_{i}" / "adapter_model.safetensors"))
        assert one.keys() == two.keys()
        assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
        assert any((one[k] != 0).any() for k in one if "lora_B" in k)  # they did train
