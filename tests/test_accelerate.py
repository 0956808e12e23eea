"""Two processes on CPU (gloo): `accelerate launch --multi_gpu --num_processes 2 -m ppap ...` for
the results, and the same two processes started by hand (the environment accelerate reads) where
each one's exit status and last line count: every error path ends both with the same error."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from ppap.cli import main
from ppap.io import exclusive_lock

TIMEOUT = 50  # seconds for a 2-process run of a tiny model (a loaded 2-core machine included): a hang fails here
GAP = 10  # seconds at most between the two processes' ends: neither waits for the other


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(*args, prelude: str = "", rank1_prelude: str = "", pythonpath: str = ""):
    """``python -m ppap ARGS`` as ranks 0 and 1 of one gloo group, each with its own exit status and
    output (``accelerate launch`` would merge them and add its own report); ``prelude`` runs first
    on both ranks, then ``rank1_prelude`` on rank 1. Returns [(status, stdout, stderr)] per rank and
    the seconds between the two processes' ends."""
    port, procs, ended = _free_port(), [], {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as files:
        logs = [(Path(tmp) / f"{rank}.out", Path(tmp) / f"{rank}.err") for rank in range(2)]
        for rank, (out, err) in enumerate(logs):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            env |= {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
            if pythonpath:
                env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
            code = (
                prelude
                + "\n"
                + (rank1_prelude if rank == 1 else "")
                + "\nimport sys\nfrom ppap.cli import main\nsys.exit(main(sys.argv[1:]))"
            )
            stdout, stderr = files.enter_context(out.open("w")), files.enter_context(err.open("w"))
            procs.append(subprocess.Popen([sys.executable, "-c", code, "--threads", "1", *args], env=env, stdout=stdout, stderr=stderr))
        deadline = time.monotonic() + TIMEOUT
        while len(ended) < 2 and time.monotonic() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in ended and proc.poll() is not None:
                    ended[rank] = time.monotonic()
            time.sleep(0.05)
        for proc in procs:
            proc.kill()
        if len(ended) < 2:
            pytest.fail(f"{args[0]}: rank(s) {sorted({0, 1} - set(ended))} still ran {TIMEOUT} s after the start (hung)")
        results = [(proc.wait(), out.read_text(), err.read_text()) for proc, (out, err) in zip(procs, logs)]
    return results, abs(ended[0] - ended[1])


def _both_fail_with(results, words: str) -> str:
    """Both processes ended with exit status 2 and the same one-line error, which says ``words``."""
    lines = [err.strip().splitlines()[-1] if err.strip() else "" for _, _, err in results]
    assert [status for status, _, _ in results] == [2, 2], lines
    assert lines[0] == lines[1] and lines[0].startswith("ppap: error: ") and words in lines[0], lines
    return lines[0]


def _generate_args(m, out, num=40):
    return ["generate", "--diffusion", m["diffusion"], "--num", str(num), "--shard-size", "8", "--steps", "3", "--out", str(out)]


def _train_args(m, data, out, *extra):
    return [
        "train",
        "--diffusion",
        m["diffusion"],
        "--guide",
        m["guide"],
        "--guide-weights",
        m["weights"],
        "--data",
        str(data),
        "--experts",
        "2",
        "--iterations",
        "8",
        "--batch-size",
        "8",
        "--per-expert-norm",
        "false",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def _shares(stdout: str) -> dict[int, list[int]]:
    """``generate``'s summary '(3 written by rank 0: shards 0, 2, 4; 2 written by rank 1: shards 1, 3)'
    -> {0: [0, 2, 4], 1: [1, 3]}."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("corpus "))
    parts = line[line.index("(") + 1 : line.rindex(")")].split("; ")
    return {int(p.split("rank ")[1].split(":")[0]): [int(k) for k in p.split("shards ")[1].split(", ")] if ":" in p else [] for p in parts}


def test_two_process_generate_train_and_sample_match_one_process(tiny_models, tmp_path):
    m = tiny_models
    out = _launch(*_generate_args(m, tmp_path / "c2")).stdout
    assert main(["--threads", "1", *_generate_args(m, tmp_path / "c1"), "--quiet"]) == 0
    assert _shares(out) == {0: [0, 2, 4], 1: [1, 3]}  # the shares handed out (what each rank wrote: the test below)
    shards = sorted(p.name for p in (tmp_path / "c2").glob("shard-*.npy"))
    assert shards == [f"shard-{k:05d}.npy" for k in range(5)]
    for name in shards:  # together exactly the one-process corpus
        assert np.array_equal(np.load(tmp_path / "c2" / name), np.load(tmp_path / "c1" / name))

    # frozen norms: then the data-parallel gradient equals the full-batch one, so weights must match
    _launch(*_train_args(m, tmp_path / "c1", tmp_path / "e2"))
    assert main(["--threads", "1", *_train_args(m, tmp_path / "c1", tmp_path / "e1")]) == 0
    for i in range(2):
        one = load_file(str(tmp_path / "e1" / f"expert_{i}" / "adapter_model.safetensors"))
        two = load_file(str(tmp_path / "e2" / f"expert_{i}" / "adapter_model.safetensors"))
        assert one.keys() == two.keys()
        assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
        assert any((one[k] != 0).any() for k in one if "lora_B" in k)  # they did train

    # guided sampling, 10 samples in batches of 3: rank 0 draws batches 0-1, rank 1 batches 2-3
    sample = ["sample", "--diffusion", m["diffusion"], "--guide", m["guide"], "--guide-weights", m["weights"]]
    sample += ["--experts", str(tmp_path / "e1"), "--target", "all", "--num", "10", "--batch-size", "3", "--steps", "3", "--scale", "5"]
    proc = _launch(*sample, "--out", str(tmp_path / "s2" / "grid.png"))
    assert main(["--threads", "1", *sample, "--quiet", "--out", str(tmp_path / "s1" / "grid.png")]) == 0
    assert "6/6" in proc.stderr and "10/10" not in proc.stderr  # the main process's progress bar: its 6 samples
    assert proc.stdout.count("wrote ") == 1  # one result, written by the main process alone
    assert sorted(p.name for p in (tmp_path / "s2").iterdir()) == ["grid.npz", "grid.png"]
    one, two = np.load(tmp_path / "s1" / "grid.npz"), np.load(tmp_path / "s2" / "grid.npz")
    assert one.files == two.files and len(one["images"]) == 10
    for key in one.files:  # bit for bit: each sample's seed is its own, and the batches are the same
        assert np.array_equal(one[key], two[key]), key
    assert len(set(one["targets"].tolist())) > 1  # per-sample targets, split with their samples
    assert (tmp_path / "s1" / "grid.png").read_bytes() == (tmp_path / "s2" / "grid.png").read_bytes()


def test_generate_shares_out_one_list_of_missing_shards(tiny_models, tmp_path):
    """Rank 1 looks at the folder only once rank 0 has written a shard: the shards must still be
    those of one list (made before any was drawn), all drawn, none twice, and success reported
    only for a whole corpus."""
    m = tiny_models
    late = (
        "import time, ppap.corpus as d\n"
        "read = d._read_manifest\n"
        "def late(root):\n"
        "    end = time.monotonic() + 20\n"
        "    while not d.shard_path(root, 0).exists() and time.monotonic() < end:\n"
        "        time.sleep(0.02)\n"
        "    return read(root)\n"
        "d._read_manifest = late\n"
    )
    log = tmp_path / "written-by-rank-"
    record = (  # each rank notes every shard file it writes
        "import os, ppap.corpus as c\n"
        "write = c.atomic_write_bytes\n"
        "def noted(path, data):\n"
        f"    with open({str(log)!r} + os.environ['RANK'], 'a') as f:\n"
        "        f.write(os.path.basename(path) + '\\n')\n"
        "    write(path, data)\n"
        "c.atomic_write_bytes = noted\n"
    )
    results, _ = _two_processes(*_generate_args(m, tmp_path / "c2"), prelude=record, rank1_prelude=late)
    assert [status for status, _, _ in results] == [0, 0], [err[-500:] for _, _, err in results]
    shares = _shares(results[0][1])
    assert shares == {0: [0, 2, 4], 1: [1, 3]}
    written = [Path(f"{log}{rank}").read_text().split() for rank in range(2)]
    assert written == [[f"shard-{k:05d}.npy" for k in shares[rank]] for rank in range(2)]  # each rank drew its share, once
    assert not set(written[0]) & set(written[1])  # disjoint
    assert sorted(written[0] + written[1]) == [f"shard-{k:05d}.npy" for k in range(5)]  # together the whole corpus
    assert main(["--threads", "1", *_generate_args(m, tmp_path / "c1"), "--quiet"]) == 0
    for k in range(5):
        name = f"shard-{k:05d}.npy"
        assert np.array_equal(np.load(tmp_path / "c2" / name), np.load(tmp_path / "c1" / name))


def test_refused_lock_and_damaged_corpus_end_both_processes(tiny_models, tmp_path):
    m = tiny_models
    assert main(["--threads", "1", *_generate_args(m, tmp_path / "c", num=16), "--quiet"]) == 0

    # the experts folder is in use: only the main process holds its lock, both stop
    (tmp_path / "e").mkdir()
    with exclusive_lock(tmp_path / "e" / ".lock"):
        results, gap = _two_processes(*_train_args(m, tmp_path / "c", tmp_path / "e"))
    _both_fail_with(results, "in use by another ppap process")
    assert gap < GAP

    # a damaged manifest: the main process opens the corpus, both stop
    shutil.copytree(tmp_path / "c", tmp_path / "bad-manifest")
    (tmp_path / "bad-manifest" / "manifest.json").write_text('{"format": "ppap-corpus-v2", "num_samples": ')
    results, gap = _two_processes(*_generate_args(m, tmp_path / "bad-manifest", num=16))
    _both_fail_with(results, "manifest")
    assert gap < GAP

    # a damaged shard: training refuses the corpus on both processes
    shutil.copytree(tmp_path / "c", tmp_path / "bad-shard")
    shard = tmp_path / "bad-shard" / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-7] + bytes(7))
    results, gap = _two_processes(*_train_args(m, tmp_path / "bad-shard", tmp_path / "e3"))
    _both_fail_with(results, "shard-00001.npy is damaged")
    assert gap < GAP
    assert not (tmp_path / "e3").exists()


def test_non_finite_values_on_one_process_stop_both(tiny_models, tmp_path):
    """The guide gives NaN on rank 1 only: in training (the teacher, in eval mode, stays finite)
    both processes stop at the same step; in sampling both stop and nothing is written."""
    m = tiny_models
    (tmp_path / "nan_on_rank1.py").write_text(
        "import os\n"
        "from ppap.models import tiny_classifier\n\n\n"
        "def _nan_on_rank1(training_only):\n"
        "    net = tiny_classifier()\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        net.register_forward_hook(lambda mod, args, out: out * float('nan') if mod.training or not training_only else out)\n"
        "    return net\n\n\n"
        "def in_training():\n"
        "    return _nan_on_rank1(True)\n\n\n"
        "def always():\n"
        "    return _nan_on_rank1(False)\n"
    )
    assert main(["--threads", "1", *_generate_args(m, tmp_path / "c", num=16), "--quiet"]) == 0
    args = _train_args(m, tmp_path / "c", tmp_path / "e")
    args[args.index(m["guide"])] = "nan_on_rank1:in_training"
    results, gap = _two_processes(*args, pythonpath=str(tmp_path))
    line = _both_fail_with(results, "expert_0 step 0: the loss is nan")
    assert gap < GAP, line
    assert not (tmp_path / "e").exists()  # nothing learnt: the folder is left as it was found (absent)

    sample = ["sample", "--diffusion", m["diffusion"], "--guide", "nan_on_rank1:always", "--guide-weights", m["weights"]]
    sample += ["--method", "naive", "--num", "4", "--batch-size", "2", "--steps", "2", "--out", str(tmp_path / "s" / "grid.png")]
    results, gap = _two_processes(*sample, pythonpath=str(tmp_path))
    line = _both_fail_with(results, "the guidance model's output is not finite")
    assert gap < GAP, line
    assert not (tmp_path / "s").exists()
