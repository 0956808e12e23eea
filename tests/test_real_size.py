"""The command line at a real size: the DDPM-CIFAR10 architecture (35.7M parameters, random
weights, saved as a diffusers pipeline folder) and a ResNet-50-architecture transformers folder
with its published image processor, through ``ppap generate`` -> ``ppap train`` (5 experts) ->
``ppap sample``, as a user with these models would run them. Few images and steps: the point is
that every path runs at these sizes (224-pixel guide input from 32-pixel images, 5 LoRA banks on
a 25.6M-parameter backbone), not what the random models draw."""

import json

import numpy as np
import pytest
import torch

from ppap.cli import main
from ppap.configs import build_model_folder


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-size")
    return {name: str(build_model_folder(name, root / name)) for name in ("ddpm-cifar10-32", "resnet-50")}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~30 s of CPU; the margin is for a machine shared with other jobs
def test_generate_train_sample_at_real_size(real_models, tmp_path, capsys):
    from ppap.corpus import load_corpus
    from ppap.loading import load_diffusion, load_experts, load_guide

    diffusion, guide = real_models["ddpm-cifar10-32"], real_models["resnet-50"]
    corpus, experts, grid = tmp_path / "corpus", tmp_path / "experts", tmp_path / "grid.png"

    assert (
        main(["generate", "--diffusion", diffusion, "--out", str(corpus), "--num", "4", "--steps", "2", "--batch-size", "4", "--quiet"])
        == 0
    )
    images = load_corpus(corpus)
    assert images.shape == (4, 3, 32, 32) and bool(torch.isfinite(images).all())

    train = ["train", "--diffusion", diffusion, "--guide", guide, "--data", str(corpus), "--out", str(experts)]
    assert main(train + ["--iterations", "2", "--batch-size", "2", "--warmup", "1", "--quiet"]) == 0
    manifest = json.loads((experts / "ppap_experts.json").read_text())
    assert manifest["trained"] == [f"expert_{i}" for i in range(5)]
    assert manifest["adapter"]["rank"] == 32 and manifest["guide"]["input_size"] == [224, 224]
    bank = load_experts(experts, load_guide(guide), load_diffusion(diffusion))
    assert bank.router.num_experts == 5 and bank.task.name == "classification" and bank.task.num_classes == 1000

    sample = ["sample", "--diffusion", diffusion, "--guide", guide, "--experts", str(experts), "--target", "3"]
    assert main(sample + ["--num", "2", "--steps", "3", "--batch-size", "2", "--scale", "10", "--out", str(grid), "--quiet"]) == 0
    capsys.readouterr()
    assert grid.exists()
    with np.load(grid.with_suffix(".npz")) as z:
        assert z["images"].shape == (2, 32, 32, 3) and z["images"].dtype == np.uint8
        assert z["targets"].tolist() == [3, 3]
