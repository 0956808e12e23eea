"""PPAP on the off-the-shelf models people have: LoRA expert banks on tiny random transformers
models (ResNet, ViT, SegFormer, DPT; built from configs, no downloads), trained data-free,
saved in peft's own format, loaded back by peft's API and by ppap's, and guiding a diffusion model."""

import copy

import pytest
import torch

from ppap import GuideModel, LoRAExperts, PPAPPipeline, TimestepRouter, TrainConfig, load_bank, train_experts
from ppap.tasks import task_for

from conftest import tiny_unet
from tiny_hf import tiny_dpt, tiny_resnet, tiny_segformer, tiny_vit

FAMILIES = {
    "resnet": (tiny_resnet, "classification"),
    "vit": (tiny_vit, "classification"),
    "segformer": (tiny_segformer, "segmentation"),
    "dpt": (tiny_dpt, "dense"),
}
CFG = TrainConfig(experts="2", rank=2, alpha=2, iterations=3, batch_size=4, lr=1e-2, checkpoint_every=100)


def _guide(family):
    factory, task = FAMILIES[family]
    # the diffusion model is 1 x 8 x 8: the guide resizes and repeats grey to RGB, as for a real ImageNet model
    return GuideModel.from_transformers(factory(), task=task, ref=family)


def _prepare(family, tmp_path):
    from diffusers import DDIMScheduler

    pipe = PPAPPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))
    guide = _guide(family)
    guide.input_size = guide.input_size or (32, 32)
    schedule = pipe.diffusion.schedule
    task = task_for(guide, pipe.image_shape, FAMILIES[family][1], tau=1.0)
    bank = LoRAExperts(copy.deepcopy(guide), TimestepRouter.uniform(2, 100), CFG.adapter_config())
    corpus = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # stands in for generated images
    before = copy.deepcopy(bank.guide.net.state_dict())
    base_out = bank.teacher(corpus)
    train_experts(bank, task, schedule, corpus, CFG, tmp_path / "bank", progress=False)
    return pipe, guide, bank, task, corpus, before, base_out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_on_transformers_models_train_save_load_and_guide(family, tmp_path):
    from peft import PeftModel

    pipe, guide, bank, task, corpus, before, base_out = _prepare(family, tmp_path)
    # the backbone is untouched: disabling the adapters gives the frozen model's output bit for bit
    assert torch.equal(bank.teacher(corpus), base_out)
    assert torch.equal(bank.teacher(corpus), guide(corpus))
    for i in range(2):  # every expert learned something
        assert not torch.allclose(bank.run_expert(i, corpus), base_out)
    if family == "segformer":  # its depthwise convs cannot take a rank-2 LoRA: left frozen, and said so
        assert bank.skipped and all("dwconv" in n for n in bank.skipped)
    # ppap's loader and peft's own API read the same files and give the same expert
    loaded = load_bank(copy.deepcopy(guide), tmp_path / "bank", schedule=pipe.diffusion.schedule)
    for i in range(2):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(guide.net), str(tmp_path / "bank" / f"expert_{i}")).eval()
        theirs = guide(corpus, net=peft_model)
        assert torch.allclose(loaded.run_expert(i, corpus), theirs, atol=1e-5)
        assert torch.allclose(bank.eval().run_expert(i, corpus), theirs, atol=1e-5)
    # guidance through the loaded bank moves the samples toward the target
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    if task.name == "classification":
        target, scale = 3, 50.0
    else:
        with torch.no_grad():
            target = task.target_from_output(guide(corpus[:1]))
        scale = 2000.0 if task.name == "segmentation" else 100.0  # per-pixel means: dense L1 gradients are larger
    common = dict(latents=latents, num_inference_steps=5, output_type="latent", progress=False)
    plain = pipe(**common).images
    guided = pipe(guide=guide, experts=loaded, target=target, classifier_scale=scale, **common).images
    term = pipe.guidance_term(3, guide=guide, experts=loaded, target=target)
    with torch.no_grad():
        ll_plain = task.log_likelihood(guide(plain.clamp(-1, 1)), term.targets)
        ll_guided = task.log_likelihood(guide(guided.clamp(-1, 1)), term.targets)
    assert (ll_guided > ll_plain).all(), (ll_plain, ll_guided)


def test_transformers_load_adapter_reads_a_bank_expert(tmp_path):
    """``model.load_adapter(bank / "expert_0")`` (transformers' own peft integration) on the bare model."""
    pytest.importorskip("peft")
    pipe, guide, bank, task, corpus, _, _ = _prepare("resnet", tmp_path)
    model = copy.deepcopy(guide.net)
    try:
        model.load_adapter(str(tmp_path / "bank" / "expert_1"), adapter_name="expert_1")
        model.set_adapter("expert_1")
    except ValueError as e:  # transformers 5 wants peft >= 0.22, which the package index here does not have
        if "version of PEFT" in str(e):
            pytest.skip(str(e))
        raise
    assert torch.allclose(guide(corpus, net=model.eval()), bank.eval().run_expert(1, corpus), atol=1e-5)


def test_transformers_folder_as_cli_guide(tmp_path, capsys):
    """``--guide`` takes a transformers model folder (with its image processor)."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from transformers import ViTImageProcessor

    from ppap.cli import main

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "ddpm")
    model = tiny_vit()
    model.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    code = main(
        [
            "--threads",
            "1",
            "sample",
            "--diffusion",
            str(tmp_path / "ddpm"),
            "--guide",
            str(tmp_path / "vit"),
            "--method",
            "naive",
            "--target",
            "2",
            "--num",
            "2",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "s.png"),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "s.npz").exists()


def test_quiet_silences_the_libraries_loading_bars_for_the_command_only(tmp_path, capsys):
    """``--quiet``: no transformers "Loading weights" bar on stderr; the libraries' bars are on again after."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from transformers import ViTImageProcessor
    from transformers.utils import logging as tf_logging

    from ppap.cli import main

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "ddpm")
    tiny_vit().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    args = ["sample", "--diffusion", str(tmp_path / "ddpm"), "--guide", str(tmp_path / "vit"), "--method", "naive"]
    args += ["--target", "2", "--num", "1", "--steps", "2", "--out", str(tmp_path / "s.png")]
    capsys.readouterr()
    assert main(args) == 0
    assert "Loading weights" in capsys.readouterr().err  # the bar this test looks for is there without --quiet
    assert main([*args, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err
    assert tf_logging.is_progress_bar_enabled()


def test_experts_on_a_transformers_model_raise_no_deprecation_warning_of_peft():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model; a
    user building a bank sees no FutureWarning for it."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoRAExperts(_guide("resnet"), TimestepRouter.uniform(2, 100), CFG.adapter_config())
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
