"""The command line end to end on tiny random models, and its one-line errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ppap.cli import main

SMALL = ["--threads", "1"]


def run(argv, capsys):
    code = main(SMALL + argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_train_sample_end_to_end(tiny_models, capsys, tmp_path):
    m = tiny_models
    corpus, experts, grid = tmp_path / "corpus", tmp_path / "experts", tmp_path / "grid.png"
    assert (
        run(
            [
                "generate",
                "--diffusion",
                m["diffusion"],
                "--out",
                str(corpus),
                "--num",
                "40",
                "--shard-size",
                "16",
                "--steps",
                "5",
                "--quiet",
            ],
            capsys,
        )[0]
        == 0
    )
    assert json.loads((corpus / "manifest.json").read_text())["num_samples"] == 40
    code, out, err = run(
        [
            "train",
            "--diffusion",
            m["diffusion"],
            "--guide",
            m["guide"],
            "--guide-weights",
            m["weights"],
            "--data",
            str(corpus),
            "--out",
            str(experts),
            "--experts",
            "0-30,30-100",
            "--iterations",
            "10",
            "--batch-size",
            "8",
            "--rank",
            "2",
            "--alpha",
            "4",
        ],
        capsys,
    )
    assert code == 0, err
    assert "expert_1 t∈[30,100)" in out
    manifest = json.loads((experts / "ppap_experts.json").read_text())
    assert manifest["boundaries"] == [0, 30, 100] and manifest["trained"] == ["expert_0", "expert_1"]
    assert manifest["adapter"]["rank"] == 2 and manifest["task"] == {"name": "classification", "num_classes": 10, "tau": 1.0}
    for method, sampler in (("ppap", "ddim"), ("ppap", "ddpm"), ("naive", "ddim"), ("x0", "ddim"), ("unguided", "ddpm")):
        code, out, err = run(
            [
                "sample",
                "--diffusion",
                m["diffusion"],
                "--guide",
                m["guide"],
                "--guide-weights",
                m["weights"],
                "--experts",
                str(experts),
                "--method",
                method,
                "--sampler",
                sampler,
                "--target",
                "3,4",
                "--num",
                "5",
                "--steps",
                "4",
                "--batch-size",
                "3",
                "--out",
                str(grid),
                "--quiet",
            ],
            capsys,
        )
        assert code == 0, err
        data = np.load(grid.with_suffix(".npz"))
        assert data["images"].shape == (5, 8, 8, 1) and data["images"].dtype == np.uint8
        assert data["targets"].tolist() == ([-1] * 5 if method == "unguided" else [3, 4, 3, 4, 3])
        assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampling_is_reproducible_and_batch_size_independent(tiny_models, capsys, tmp_path):
    m = tiny_models
    outs = []
    for bs in ("4", "2"):
        out = tmp_path / f"u{bs}.png"
        assert (
            run(
                [
                    "sample",
                    "--diffusion",
                    m["diffusion"],
                    "--method",
                    "unguided",
                    "--num",
                    "4",
                    "--steps",
                    "3",
                    "--batch-size",
                    bs,
                    "--seed",
                    "7",
                    "--out",
                    str(out),
                    "--quiet",
                ],
                capsys,
            )[0]
            == 0
        )
        outs.append(np.load(out.with_suffix(".npz"))["images"])
    assert np.array_equal(outs[0], outs[1])


def test_class_label_classifier_free_guidance_from_the_cli(tmp_path, capsys):
    """`--class-label 1 --negative-class-label 3 --cfg-scale 3` samples what the library samples
    with that null class; without a null class it is a one-line error naming the flag."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler

    from ppap import Conditioning, PPAPPipeline
    from ppap.batch_sampling import sample_images
    from ppap.images import to_hwc_uint8

    from conftest import tiny_unet

    folder = tmp_path / "cond"
    DDPMPipeline(unet=tiny_unet(num_class_embeds=4), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    common = ["sample", "--diffusion", str(folder), "--num", "2", "--steps", "3", "--class-label", "1", "--method", "unguided", "--quiet"]
    images = {}
    for null in ("3", "0"):
        out = tmp_path / f"null{null}.png"
        assert run(common + ["--cfg-scale", "3", "--negative-class-label", null, "--out", str(out)], capsys)[0] == 0
        images[null] = np.load(out.with_suffix(".npz"))["images"]
    pipe = PPAPPipeline.from_pretrained(folder)
    cond = Conditioning(torch.tensor([1, 1]), negative_class_labels=torch.tensor([3, 3]), guidance_scale=3.0)
    x = sample_images(pipe, 2, seed=0, conditioning=cond, progress=False, num_inference_steps=3, sampler="ddim")
    assert np.array_equal(images["3"], to_hwc_uint8(x))
    assert not np.array_equal(images["3"], images["0"])  # the null class is the one given
    code, _, err = run(common + ["--cfg-scale", "3", "--out", str(tmp_path / "x.png")], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("ppap: error: ") and "needs --negative-class-label" in last


FIXED_SIZE_MODULE = """
import torch
from torch import nn

def needs_28px():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
"""


@pytest.fixture
def bad_inputs(tiny_models, tmp_path, monkeypatch, capsys):
    (tmp_path / "user_models.py").write_text(FIXED_SIZE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from safetensors.torch import save_file
    from torch import nn

    save_file(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).state_dict(), str(tmp_path / "w28.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "weights.pt").write_bytes(b"pickle")
    corpus, experts = tmp_path / "corpus", tmp_path / "experts"
    m = tiny_models
    run(["generate", "--diffusion", m["diffusion"], "--out", str(corpus), "--num", "8", "--steps", "2", "--quiet"], capsys)
    run(
        [
            "train",
            "--diffusion",
            m["diffusion"],
            "--guide",
            m["guide"],
            "--guide-weights",
            m["weights"],
            "--data",
            str(corpus),
            "--out",
            str(experts),
            "--experts",
            "2",
            "--iterations",
            "2",
            "--batch-size",
            "4",
            "--quiet",
        ],
        capsys,
    )
    bad_manifest = tmp_path / "bad_manifest"
    bad_manifest.mkdir()
    (bad_manifest / "ppap_experts.json").write_text('{"format": "something-else"}')
    return m | {"tmp": tmp_path, "corpus": str(corpus), "experts": str(experts), "bad_manifest": str(bad_manifest)}


def _sample(b, *extra, weights=None):
    return [
        "sample",
        "--diffusion",
        b["diffusion"],
        "--guide",
        b["guide"],
        "--guide-weights",
        weights or b["weights"],
        "--num",
        "2",
        "--steps",
        "2",
        "--quiet",
        "--out",
        str(b["tmp"] / "never.png"),
        *extra,
    ]


def _bench_folder_of_another_config(tmp: Path) -> str:
    import dataclasses

    from ppap.bench import BenchConfig

    (tmp / "old-bench" / "stages").mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(BenchConfig(per_class=7))
    (tmp / "old-bench" / "stages" / "config.json").write_text(json.dumps(config))
    return str(tmp / "old-bench")


CASES = {
    "class index": (
        lambda b: _sample(b, "--method", "naive", "--target", "10"),
        "class index 10 is out of range: the guidance model has 10 classes (0..9)",
    ),
    "class name": (lambda b: _sample(b, "--method", "naive", "--target", "giraffe"), "bad class target 'giraffe'"),
    "image size": (
        lambda b: [
            "sample",
            "--diffusion",
            b["diffusion"],
            "--guide",
            "user_models:needs_28px",
            "--guide-weights",
            str(b["tmp"] / "w28.safetensors"),
            "--method",
            "naive",
            "--num",
            "2",
            "--quiet",
        ],
        "user_models:needs_28px cannot take images of shape [1, 8, 8]",
    ),
    "missing weights": (lambda b: _sample(b, "--method", "naive", weights="nope.safetensors"), "weights file not found: nope.safetensors"),
    "corrupt weights": (
        lambda b: _sample(b, "--method", "naive", weights=str(b["tmp"] / "corrupt.safetensors")),
        "is corrupt or not safetensors",
    ),
    "pickle weights": (
        lambda b: _sample(b, "--method", "naive", weights=str(b["tmp"] / "weights.pt")),
        "ppap loads weights only from .safetensors files",
    ),
    "missing experts": (lambda b: _sample(b, "--experts", str(b["tmp"] / "nowhere")), "experts directory not found"),
    "wrong manifest": (lambda b: _sample(b, "--experts", b["bad_manifest"]), "is not a ppap expert manifest"),
    "missing diffusion": (
        lambda b: ["sample", "--diffusion", str(b["tmp"] / "nope"), "--method", "unguided"],
        "diffusion model directory not found",
    ),
    "bad factory": (
        lambda b: ["sample", "--diffusion", b["diffusion"], "--guide", "no_such_module:f", "--guide-weights", "x"],
        "cannot import 'no_such_module'",
    ),
    "unknown method": (lambda b: _sample(b, "--method", "magic"), "unknown guidance method 'magic'"),
    "ppap without experts": (lambda b: _sample(b, "--method", "ppap"), "method 'ppap' needs --experts"),
    "range gap": (
        lambda b: [
            "train",
            "--diffusion",
            b["diffusion"],
            "--guide",
            b["guide"],
            "--guide-weights",
            b["weights"],
            "--data",
            b["corpus"],
            "--out",
            str(b["tmp"] / "e2"),
            "--experts",
            "0-40,50-100",
        ],
        "gap between timestep ranges [0, 40) and [50, 100): timesteps 40..49 have no expert",
    ),
    "bench workers": (
        lambda b: ["bench", "classifier", "--workers", "0", "--out", str(b["tmp"] / "bench")],
        "--workers must be >= 1 (got 0)",
    ),
    "bench unknown ablation": (
        lambda b: ["bench", "classifier", "--ablations", "warm start,rank 99", "--out", str(b["tmp"] / "bench")],
        "unknown ablation 'rank 99'",
    ),
    "bench unknown extra row": (
        lambda b: ["bench", "classifier", "--extra-rows", "ppap-10,ppap-20", "--out", str(b["tmp"] / "bench")],
        "unknown extra row 'ppap-20'",
    ),
    "extra rows of the dense bench": (
        lambda b: ["bench", "dense", "--extra-rows", "all", "--out", str(b["tmp"] / "bench-dense")],
        "--workers, --ablations and --extra-rows apply to `ppap bench classifier` only",
    ),
    "bench of another configuration": (
        lambda b: ["bench", "classifier", "--out", _bench_folder_of_another_config(b["tmp"])],
        "holds stages of another bench configuration (per_class: 7 there, 100 here)",
    ),
    "not a corpus": (
        lambda b: [
            "train",
            "--diffusion",
            b["diffusion"],
            "--guide",
            b["guide"],
            "--guide-weights",
            b["weights"],
            "--data",
            str(b["tmp"]),
            "--out",
            str(b["tmp"] / "e3"),
        ],
        "is not a ppap corpus",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(bad_inputs, capsys, case):
    argv, message = CASES[case]
    code, out, err = run(argv(bad_inputs), capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ppap: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not (bad_inputs["tmp"] / "never.png").exists() and not (bad_inputs["tmp"] / "never.npz").exists()


def test_experts_of_another_guide_model_are_refused(bad_inputs, capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    from ppap.models import tiny_classifier

    torch.manual_seed(123)
    save_file(tiny_classifier().state_dict(), str(tmp_path / "other.safetensors"))
    b = bad_inputs
    code, _, err = run(
        [
            "sample",
            "--diffusion",
            b["diffusion"],
            "--guide",
            b["guide"],
            "--guide-weights",
            str(tmp_path / "other.safetensors"),
            "--experts",
            b["experts"],
            "--num",
            "2",
            "--quiet",
        ],
        capsys,
    )
    assert code == 2 and "were trained on ppap.models:tiny_classifier" in err


def _ppap(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "ppap", "--threads", "1", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


def _shards(root: Path):
    return {p.name: np.load(p) for p in sorted(root.glob("shard-*.npy"))}


def test_generate_resumes_after_kill_without_loss_or_duplicates(tiny_models, tmp_path):
    args = [
        "generate",
        "--diffusion",
        tiny_models["diffusion"],
        "--num",
        "100",
        "--shard-size",
        "10",
        "--steps",
        "20",
        "--batch-size",
        "5",
        "--quiet",
    ]
    ref = _ppap(*args, "--out", str(tmp_path / "ref"))
    victim = _ppap(*args, "--out", str(tmp_path / "run"))
    deadline = time.time() + 120
    while len(list((tmp_path / "run").glob("shard-*.npy"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    victim.kill()  # SIGKILL: no cleanup, like a crash or a power cut
    victim.wait()
    written = len(list((tmp_path / "run").glob("shard-*.npy")))
    assert 2 <= written < 10, "the kill should land mid-run"
    assert _ppap(*args, "--out", str(tmp_path / "run")).wait() == 0
    assert ref.wait() == 0
    got, want = _shards(tmp_path / "run"), _shards(tmp_path / "ref")
    assert list(got) == list(want) and len(got) == 10
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert sum(len(v) for v in got.values()) == 100


def test_generate_reuse_copies_the_shards_a_smaller_corpus_holds(tiny_models, capsys, tmp_path):
    """A larger corpus with --reuse is the corpus drawn from scratch, drawing only the new shards."""
    import torch

    from ppap.corpus import load_corpus

    args = ["generate", "--diffusion", tiny_models["diffusion"], "--shard-size", "16", "--steps", "3"]
    assert run(args + ["--out", str(tmp_path / "small"), "--num", "40", "--quiet"], capsys)[0] == 0
    code, out, err = run(args + ["--out", str(tmp_path / "big"), "--num", "72", "--reuse", str(tmp_path / "small")], capsys)
    assert code == 0, err
    assert "reused 2 shards" in out and "(3 written by rank 0)" in out  # shards 0-1; the small corpus's shard 2 is partial
    assert run(args + ["--out", str(tmp_path / "fresh"), "--num", "72", "--quiet"], capsys)[0] == 0
    assert torch.equal(load_corpus(tmp_path / "big"), load_corpus(tmp_path / "fresh"))
    code, _, err = run(args + ["--out", str(tmp_path / "other"), "--num", "72", "--seed", "1", "--reuse", str(tmp_path / "small")], capsys)
    assert code == 2 and err.count("\n") == 1 and "drawn with other settings (seed: 0 there, 1 here); nothing reused" in err, err
