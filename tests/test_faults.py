"""Fault cases of the command line (tiny random models): each ends in one line on stderr with
the right exit status and leaves the folders as it found them, or is repaired by a re-run.
The categories follow the fault probe of the hardening issue: non-finite values, validation
before anything is written, damaged files, bad arguments, and kill -9 at a random point."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ppap.cli import main


def run(argv, capsys):
    code = main(["--threads", "1"] + argv)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny diffusion folder, a tiny classifier (sane, NaN and inf weights), a corpus and a bank."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ppap.models import tiny_classifier

    from conftest import tiny_unet

    def ok(*argv: str) -> None:
        assert main(["--threads", "1", *argv]) == 0

    root = tmp_path_factory.mktemp("world")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(root / "ddpm")
    torch.manual_seed(1)
    state = tiny_classifier().state_dict()
    save_file(state, str(root / "clf.safetensors"))
    save_file({k: v.clone().fill_(float("nan")) if k == "fc.weight" else v for k, v in state.items()}, str(root / "nan.safetensors"))
    save_file({k: v.clone().fill_(float("inf")) if k == "fc.bias" else v for k, v in state.items()}, str(root / "inf.safetensors"))
    guide = ["--guide", "ppap.models:tiny_classifier", "--guide-weights", str(root / "clf.safetensors")]
    small = ["--experts", "2", "--iterations", "2", "--batch-size", "4", "--quiet"]
    ok(
        "generate",
        "--diffusion",
        str(root / "ddpm"),
        "--out",
        str(root / "corpus"),
        "--num",
        "16",
        "--shard-size",
        "8",
        "--steps",
        "2",
        "--quiet",
    )
    ok("train", "--diffusion", str(root / "ddpm"), *guide, "--data", str(root / "corpus"), "--out", str(root / "experts"), *small)
    # an RGB world: experts of an RGB classifier must be refused by the grey diffusion model, in one line
    rgb_unet = tiny_unet(in_channels=3, out_channels=3)
    DDPMPipeline(unet=rgb_unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(root / "rgb")
    torch.manual_seed(2)
    save_file(tiny_classifier(in_channels=3).state_dict(), str(root / "rgb.safetensors"))
    rgb_guide = ["--guide", "ppap.models:tiny_rgb_classifier", "--guide-weights", str(root / "rgb.safetensors")]
    ok("generate", "--diffusion", str(root / "rgb"), "--out", str(root / "rgb-corpus"), "--num", "8", "--steps", "2", "--quiet")
    ok(
        "train",
        "--diffusion",
        str(root / "rgb"),
        *rgb_guide,
        "--data",
        str(root / "rgb-corpus"),
        "--out",
        str(root / "rgb-experts"),
        "--experts",
        "1",
        "--iterations",
        "1",
        "--batch-size",
        "4",
        "--quiet",
    )
    return {"root": root, "ddpm": str(root / "ddpm"), "guide": guide, "corpus": str(root / "corpus"), "experts": str(root / "experts")}


def _sample(w, *extra, weights=None, out=None):
    guide = ["--guide", "ppap.models:tiny_classifier", "--guide-weights", weights] if weights else w["guide"]
    return [
        "sample",
        "--diffusion",
        w["ddpm"],
        *guide,
        "--num",
        "2",
        "--steps",
        "2",
        "--quiet",
        "--out",
        out or str(w["root"] / "out" / "never.png"),
        *extra,
    ]


def _train(w, *extra, out="never-experts"):
    return [
        "train",
        "--diffusion",
        w["ddpm"],
        *w["guide"],
        "--data",
        w["corpus"],
        "--out",
        str(w["root"] / out),
        "--experts",
        "2",
        "--iterations",
        "2",
        "--batch-size",
        "4",
        "--quiet",
        *extra,
    ]


def _generate(w, *extra, out="never-corpus"):
    return ["generate", "--diffusion", w["ddpm"], "--out", str(w["root"] / out), "--num", "4", "--steps", "2", "--quiet", *extra]


def _bank_copy(w, name, mutate):
    """A copy of the trained bank with one thing changed."""
    import shutil

    dst = w["root"] / name
    if not dst.exists():
        shutil.copytree(w["experts"], dst)
        mutate(dst)
    return str(dst)


def _nan_adapters(folder: Path):
    """NaN adapter weights *with* matching checksums: the bank loads, guidance must catch it."""
    from ppap.bank_format import BANK_MANIFEST
    from ppap.io import file_sha256

    path = folder / "expert_0" / "adapter_model.safetensors"
    save_file({k: v.clone().fill_(float("nan")) if "lora_B" in k else v for k, v in load_file(str(path)).items()}, str(path))
    manifest = json.loads((folder / BANK_MANIFEST).read_text())
    manifest["files"]["expert_0/adapter_model.safetensors"] = file_sha256(path)
    (folder / BANK_MANIFEST).write_text(json.dumps(manifest))


def _swap_adapter(folder: Path):
    (folder / "expert_0" / "adapter_model.safetensors").write_bytes((folder / "expert_1" / "adapter_model.safetensors").read_bytes())


def _manifest(text):
    return lambda folder: (folder / "ppap_experts.json").write_text(text)


def _drop_key(key):
    def mutate(folder):
        m = json.loads((folder / "ppap_experts.json").read_text())
        m.pop(key)
        (folder / "ppap_experts.json").write_text(json.dumps(m))

    return mutate


def _diffusion_with_scheduler(w, name, config):
    import shutil

    dst = w["root"] / name
    if not dst.exists():
        shutil.copytree(w["ddpm"], dst)
        (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return str(dst)


def _file(w, name="a-file"):
    (w["root"] / name).write_text("not a folder")
    return str(w["root"] / name)


CASES = {  # name: (argv builder, exit status, message)
    # non-finite values never reach a file
    "sample --scale nan": (lambda w: _sample(w, "--method", "naive", "--scale", "nan"), 2, "bad --scale nan: expected a finite number"),
    "sample --scale inf": (lambda w: _sample(w, "--method", "naive", "--scale", "inf"), 2, "expected a finite number"),
    "sample --scale 1e30": (lambda w: _sample(w, "--method", "naive", "--scale", "1e30"), 2, "non-finite at t="),
    "sample --eta nan": (lambda w: _sample(w, "--method", "naive", "--eta", "nan"), 2, "bad --eta nan"),
    "sample --eta -1": (lambda w: _sample(w, "--method", "naive", "--eta", "-1"), 2, "eta must be a finite number >= 0"),
    "term scale=nan": (
        lambda w: _sample(
            w,
            "--method",
            "unguided",
            "--term",
            f"guide=ppap.models:tiny_classifier,guide_weights={w['root'] / 'clf.safetensors'},scale=nan",
        ),
        2,
        "bad guidance scale 'nan'",
    ),
    "NaN guide, naive": (
        lambda w: _sample(w, "--method", "naive", weights=str(w["root"] / "nan.safetensors")),
        2,
        "naive ppap.models:tiny_classifier (classification) x30: the guidance model's output is not finite",
    ),
    "NaN guide, x0": (
        lambda w: _sample(w, "--method", "x0", weights=str(w["root"] / "nan.safetensors")),
        2,
        "x0 ppap.models:tiny_classifier",
    ),
    "inf guide, x0-shortcut": (
        lambda w: _sample(w, "--method", "x0-shortcut", weights=str(w["root"] / "inf.safetensors")),
        2,
        "the guidance model's output is not finite",
    ),
    "NaN adapter weights": (
        lambda w: _sample(w, "--experts", _bank_copy(w, "nan-bank", _nan_adapters)),
        2,
        "ppap ppap.models:tiny_classifier (classification) x30: the guidance model's output is not finite",
    ),
    "train --lr inf": (lambda w: _train(w, "--lr", "inf"), 2, "lr must be a finite number > 0, got inf"),
    "train --lr nan": (lambda w: _train(w, "--lr", "nan"), 2, "lr must be a finite number > 0, got nan"),
    "train --tau 0": (lambda w: _train(w, "--tau", "0"), 2, "tau must be a finite number > 0, got 0"),
    "train --alpha nan": (lambda w: _train(w, "--alpha", "nan"), 2, "alpha must be a finite number > 0"),
    "train, inf guide": (
        lambda w: [
            "train",
            "--diffusion",
            w["ddpm"],
            "--guide",
            "ppap.models:tiny_classifier",
            "--guide-weights",
            str(w["root"] / "inf.safetensors"),
            "--data",
            w["corpus"],
            "--out",
            str(w["root"] / "never-experts"),
            "--experts",
            "2",
            "--iterations",
            "2",
            "--batch-size",
            "4",
            "--quiet",
        ],
        2,
        "the guidance model gives non-finite outputs on 16 of 16 training images",
    ),
    "train diverging": (lambda w: _train(w, "--lr", "1e30", "--iterations", "30"), 2, "the loss is nan"),
    # validation before anything is written
    "generate --steps 0": (lambda w: _generate(w, "--steps", "0"), 2, "steps must be >= 1, got 0"),
    "generate --eta nan": (lambda w: _generate(w, "--eta", "nan"), 2, "bad --eta nan"),
    "generate --batch-size 0": (lambda w: _generate(w, "--batch-size", "0"), 2, "batch size must be >= 1, got 0"),
    "generate --batch-size -3": (lambda w: _generate(w, "--batch-size", "-3"), 2, "batch size must be >= 1, got -3"),
    "generate --shard-size 0": (lambda w: _generate(w, "--shard-size", "0"), 2, "shard size must be >= 1, got 0"),
    "generate --num 0": (lambda w: _generate(w, "--num", "0"), 2, "corpus size must be >= 1, got 0"),
    "generate --sampler magic": (lambda w: _generate(w, "--sampler", "magic"), 2, "unknown sampler 'magic'"),
    "generate --out a file": (lambda w: _generate(w, out="a-file") if _file(w) else None, 2, "is a file, not a folder"),
    "train --checkpoint-every 0": (lambda w: _train(w, "--checkpoint-every", "0"), 2, "checkpoint_every must be >= 1, got 0"),
    "train --limit 0": (lambda w: _train(w, "--limit", "0"), 2, "--limit must be >= 1, got 0"),
    "train --config wrong type": (
        lambda w: _train(w, "--config", _json(w, "bad-type.json", {"rank": "big"})),
        2,
        "training option rank must be int, got 'big'",
    ),
    "train --config a list": (lambda w: _train(w, "--config", _json(w, "list.json", [1, 2])), 2, "must hold a JSON object"),
    "train --config unknown key": (lambda w: _train(w, "--config", _json(w, "unknown.json", {"rnak": 4})), 2, "unknown key 'rnak'"),
    "train --out under a file": (lambda w: _train(w, out="a-file2/x") if _file(w, "a-file2") else None, 2, "is a file, not a folder"),
    "sample --batch-size 0": (lambda w: _sample(w, "--method", "naive", "--batch-size", "0"), 2, "--batch-size and --nrow must be >= 1"),
    "sample --batch-size -1": (lambda w: _sample(w, "--method", "naive", "--batch-size", "-1"), 2, "--batch-size and --nrow must be >= 1"),
    "sample --nrow 0": (lambda w: _sample(w, "--method", "naive", "--nrow", "0"), 2, "--batch-size and --nrow must be >= 1"),
    "sample --num 0": (lambda w: _sample(w, "--method", "naive", "--num", "0"), 2, "--num must be >= 1"),
    "sample --out a folder": (lambda w: _sample(w, "--method", "naive", out=str(w["root"])), 2, "--out must be a .png path"),
    "sample --out .png folder": (lambda w: _sample(w, "--method", "naive", out=_dir(w, "folder.png")), 2, "is a directory"),
    "sample --out under a file": (
        lambda w: _sample(w, "--method", "naive", out=_file(w, "a-file3") + "/x.png"),
        2,
        "is a file, not a folder",
    ),
    "sample --steps 0": (lambda w: _sample(w, "--method", "naive", "--steps", "0"), 2, "number of sampling steps 0"),
    "sample --device bogus": (lambda w: _sample(w, "--device", "bogus"), 2, "unknown device 'bogus'"),
    "sample --dtype float8": (lambda w: _sample(w, "--dtype", "float8"), 2, "unknown dtype 'float8'"),
    "sample --class-label x": (lambda w: _sample(w, "--class-label", "x"), 2, "bad --class-label 'x'"),
    "sample --cfg-scale alone": (lambda w: _sample(w, "--cfg-scale", "3"), 2, "--cfg-scale needs a conditional model"),
    "sample --prompt-embeds missing": (lambda w: _sample(w, "--prompt-embeds", "nope.safetensors"), 2, "weights file not found"),
    # damaged files
    "RGB experts, grey model": (
        lambda w: [
            "sample",
            "--diffusion",
            w["ddpm"],
            "--guide",
            "ppap.models:tiny_rgb_classifier",
            "--guide-weights",
            str(w["root"] / "rgb.safetensors"),
            "--experts",
            str(w["root"] / "rgb-experts"),
            "--num",
            "2",
            "--steps",
            "2",
            "--quiet",
            "--out",
            str(w["root"] / "out" / "never.png"),
        ],
        2,
        "cannot take images of shape [1, 8, 8]",
    ),
    "expert manifest a list": (
        lambda w: _sample(w, "--experts", _bank_copy(w, "list-bank", _manifest("[1, 2]"))),
        2,
        "is not a ppap expert manifest",
    ),
    "expert manifest truncated": (
        lambda w: _sample(w, "--experts", _bank_copy(w, "trunc-bank", _manifest('{"format": "ppap-'))),
        2,
        "is not valid JSON",
    ),
    "expert manifest missing key": (
        lambda w: _sample(w, "--experts", _bank_copy(w, "nokey-bank", _drop_key("boundaries"))),
        2,
        "lacks field 'boundaries'",
    ),
    "adapter file swapped": (
        lambda w: _sample(w, "--experts", _bank_copy(w, "swapped-bank", _swap_adapter)),
        2,
        "does not match its checksum",
    ),
    "scheduler config a list": (
        lambda w: _generate(w, "--diffusion", _diffusion_with_scheduler(w, "list-sched", [])),
        2,
        "a scheduler config is a JSON object",
    ),
    "scheduler beta_end 1.5": (
        lambda w: _generate(w, "--diffusion", _diffusion_with_scheduler(w, "beta-sched", {"beta_end": 1.5})),
        2,
        "scheduler betas must lie in (0, 1]",
    ),
    "scheduler thresholding": (
        lambda w: _generate(w, "--diffusion", _diffusion_with_scheduler(w, "thr-sched", {"thresholding": True})),
        2,
        "thresholding=True (dynamic thresholding) is not supported",
    ),
}


def _json(w, name, obj):
    (w["root"] / name).write_text(json.dumps(obj))
    return str(w["root"] / name)


def _dir(w, name):
    (w["root"] / name).mkdir(exist_ok=True)
    return str(w["root"] / name)


@pytest.mark.parametrize("case", list(CASES))
def test_fault_is_one_line_and_leaves_no_trace(world, capsys, case):
    build, status, message = CASES[case]
    argv = build(world)
    before = snapshot(world["root"])
    code, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("ppap: error: ") and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert snapshot(world["root"]) == before, "a failed command changed the folder"


def test_a_corrected_generate_then_runs(world, capsys):
    """Validation first: a refused command leaves no manifest, so the corrected one is accepted."""
    out = world["root"] / "fixed-corpus"
    assert run(_generate(world, "--steps", "0", out="fixed-corpus"), capsys)[0] == 2 and not out.exists()
    assert run(_generate(world, "--eta", "nan", out="fixed-corpus"), capsys)[0] == 2 and not out.exists()
    assert run(_generate(world, out="fixed-corpus"), capsys)[0] == 0
    assert (out / "manifest.json").exists()


def test_a_diverged_training_can_be_rerun_with_a_sane_learning_rate(world, capsys):
    out = "diverged-experts"
    code, _, err = run(_train(world, "--lr", "1e30", "--iterations", "30", out=out), capsys)
    assert code == 2 and "the loss is nan" in err
    assert not (world["root"] / out / "ppap_experts.json").exists()
    assert run(_train(world, out=out), capsys)[0] == 0


def test_exit_status_of_interrupts_and_internal_errors(world, capsys, monkeypatch):
    import ppap.cli

    def interrupted(args):
        raise KeyboardInterrupt

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    for fn, status in ((interrupted, 130), (broken, 1)):
        monkeypatch.setattr(ppap.cli, "cmd_zoo", fn)  # build_parser looks the command up when main runs
        code = main(["zoo", "list"])
        err = capsys.readouterr().err
        assert code == status, err
        assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "zoo", "list"])


def _ppap(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "ppap", "--threads", "1", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_train_killed_at_a_random_point_resumes_to_the_same_experts(world, tmp_path):
    """kill -9 anywhere in `ppap train` (checkpoints every 5 steps), then re-run: the adapters are
    byte-identical to an uninterrupted run's."""
    args = [
        "train",
        "--diffusion",
        world["ddpm"],
        *world["guide"],
        "--data",
        world["corpus"],
        "--experts",
        "2",
        "--iterations",
        "40",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "5",
        "--quiet",
    ]
    ref = _ppap(*args, "--out", str(tmp_path / "ref"))
    assert ref.wait() == 0, ref.stderr.read()
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(2.0, 6.0)  # start-up takes ~2 s; training the 2 experts a few more
    victim = _ppap(*args, "--out", str(tmp_path / "run"))
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert _ppap(*args, "--out", str(tmp_path / "run")).wait() == 0
    files = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.safetensors"))
    assert len(files) == 2
    for f in files:
        assert (tmp_path / "run" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f"kill after {delay:.2f} s (seed {seed})"


def test_an_experts_folder_in_use_is_refused(world, capsys):
    """Two writers of one experts folder: the second is refused in one line, the folder untouched."""
    from ppap.io import exclusive_lock

    out = world["root"] / "busy-experts"
    out.mkdir()
    with exclusive_lock(out / ".lock"):
        before = snapshot(out)
        code, _, err = run(_train(world, out="busy-experts"), capsys)
        assert code == 2 and "is in use by another ppap process" in err and snapshot(out) == before
    assert run(_train(world, out="busy-experts"), capsys)[0] == 0  # once free, it trains
