"""The published architectures (ppap.configs) and ``ppap bench scale``.

The parameter counts are those of the model cards (within 1%), counted on the meta device so
that no test allocates a 370M-parameter UNet; the guides' image processors give the input
sizes and normalisations their cards publish; the schedulers load into ppap. The bench's quick
version runs end to end on the smallest real pair (DDPM-CIFAR10 x ResNet-50), resumes, and
refuses bad options in one line."""

import json

import pytest
import torch

from ppap.cli import main
from ppap.configs import ARCHITECTURES, config_dir, count_parameters, instantiate
from ppap.io import PPAPError, read_json


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_parameter_count_is_the_model_cards(name):
    count = count_parameters(name)
    assert abs(count - ARCHITECTURES[name].parameters) <= 0.01 * ARCHITECTURES[name].parameters, (name, count)


# what the model cards / configs publish: (input size, resample mode, mean, std)
PROCESSORS = {
    "resnet-50": ((224, 224), "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "vit-base-patch16-224": ((224, 224), "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "segformer-b0-ade-512": ((512, 512), "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dpt-large": ((384, 384), "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
TASKS = {
    "resnet-50": "classification",
    "vit-base-patch16-224": "classification",
    "segformer-b0-ade-512": "segmentation",
    "dpt-large": "dense",
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_guide_preprocessing_is_the_published_one(name):
    import transformers

    from ppap.guide_model import GuideModel

    processor = transformers.AutoImageProcessor.from_pretrained(config_dir(name))
    guide = GuideModel.from_transformers(instantiate(name, "meta"), processor)
    size, resize, mean, std = PROCESSORS[name]
    assert guide.input_size == size and guide.resize == resize and guide.task == TASKS[name]
    assert guide.mean == pytest.approx(mean) and guide.std == pytest.approx(std)


UNETS = {  # (class, sample size, in channels, out channels, conditioning)
    "ddpm-cifar10-32": ("UNet2DModel", 32, 3, 3, None),
    "ddpm-celebahq-256": ("UNet2DModel", 256, 3, 3, None),
    "adm-imagenet-64": ("UNet2DModel", 64, 3, 6, "num_class_embeds"),
    "if-i-m-64": ("UNet2DConditionModel", 64, 3, 6, "encoder_hid_dim"),
}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_and_scheduler_configs_load_into_ppap(name):
    from ppap.diffusion import NoiseSchedule

    cls, size, cin, cout, cond = UNETS[name]
    unet = instantiate(name, "meta")
    assert type(unet).__name__ == cls
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (size, cin, cout)
    assert cond is None or getattr(unet.config, cond)
    schedule = NoiseSchedule.from_config(read_json(config_dir(name) / "scheduler_config.json", "scheduler config"))
    assert schedule.num_train_timesteps == 1000
    assert schedule.variance_type == ("learned_range" if cout == 2 * cin else "fixed_large")


def test_unknown_architecture_is_one_line():
    from ppap.configs import architecture

    with pytest.raises(PPAPError, match="unknown architecture 'resnet-51'"):
        architecture("resnet-51")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "scale", "--quick", "--batch-sizes", "1,x"], "bad --batch-sizes '1,x'"),
        (["bench", "scale", "--quick", "--batch-sizes", "0"], "every size must be >= 1"),
        (["bench", "scale", "--quick", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["bench", "dense", "--quick", "--device", "cpu"], "--device applies to `ppap bench scale` and `ppap bench rgb` only"),
    ],
)
def test_bench_scale_bad_options_are_one_line(argv, message, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "stages").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_scale_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["bench", "scale", "--quick", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_scale_quick_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "scale"
    assert main(["bench", "scale", "--quick", "--quiet", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert not r["errors"]
    pair = r["pairs"]["ddpm-cifar10-32+resnet-50"]
    seconds = pair["b1"]["seconds"]
    parts = ("unet_forward", "unet_forward_backward", "guide_forward_backward", "resize_forward_backward", "expert_switch")
    assert all(seconds[k] > 0 for k in ("unguided", "naive", "ppap", "x0") + parts)
    assert all(pair["b1"]["memory"][m]["peak_mib"] > 0 for m in ("unguided", "naive", "ppap", "x0"))
    bank = pair["bank"]
    assert bank["experts"] == 5 and bank["rank"] == 32 and bank["full_copies_mib"] == pytest.approx(5 * bank["guide_mib"], rel=1e-3)
    assert 0 < bank["bank_mib"] < bank["full_copies_mib"]
    assert pair["train"]["seconds_per_step"] > 0
    thr = r["throughput"]["ddpm-cifar10-32"]
    assert thr["ppap_images_per_s"] > 0 and thr["diffusers_images_per_s"] > 0
    assert r["architectures"]["ddpm-cifar10-32"]["parameters"] == count_parameters("ddpm-cifar10-32")
    report = (out / "report.md").read_text()
    assert "| ddpm-cifar10-32+resnet-50 | 1 |" in report and "Targets:" in report
    assert (out / "bench_scale.png").stat().st_size > 0
    stages = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json") if p.name != "seconds.json"}
    assert main(["bench", "scale", "--quick", "--quiet", "--out", str(out)]) == 0  # resumes: nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json") if p.name != "seconds.json"} == stages
    missing = out / "stages" / "ddpm-cifar10-32+resnet-50-b1-memory-x0.json"
    missing.unlink()  # --report-only reports what is there and measures nothing
    assert main(["bench", "scale", "--quick", "--quiet", "--report-only", "--out", str(out)]) == 0
    assert not missing.exists()
    r = json.loads((out / "results.json").read_text())
    assert r["errors"] == {"ddpm-cifar10-32+resnet-50-b1-memory-x0": "not measured (--report-only)"}
    assert "not measured (--report-only)" in (out / "report.md").read_text()
    capsys.readouterr()


@pytest.mark.slow
def test_measurements_run_in_a_new_process_and_a_killed_one_is_an_error():
    import os

    from ppap.bench.common import in_fresh_process

    assert in_fresh_process(os.getpid) != os.getpid()
    with pytest.raises(PPAPError, match="killed"):  # not a hang (multiprocessing.Pool would wait forever)
        in_fresh_process(os._exit, 1)


def test_a_step_that_runs_out_of_memory_is_left_out_not_fatal():
    from ppap.bench.scale_measurements import _fits

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def other_error():
        raise RuntimeError("a bug")

    assert not _fits(out_of_memory, torch.device("cpu")) and _fits(lambda: None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="a bug"):  # only memory is forgiven
        _fits(other_error, torch.device("cpu"))
