"""The shipped models are real: they load, and they do what their model cards say."""

import json
from pathlib import Path

import pytest
import torch

from ppap import zoo
from ppap.fashion_mnist import fashion_mnist_dir, load_fashion_mnist
from ppap.loading import load_diffusion, load_guide
from ppap.metrics import accuracy

needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def needs(name):
    return pytest.mark.skipif(not zoo.ZOO[name].available, reason=f"zoo model {name} is not built in this checkout")


@pytest.fixture(scope="module")
def test_set():
    return load_fashion_mnist("test")


@needs_data
@needs("fashion-classifier")
@needs("fashion-evaluator")
def test_classifiers_reach_their_card_accuracy(test_set):
    x, y = test_set
    for name, floor in (("fashion-classifier", 0.90), ("fashion-evaluator", 0.92)):
        acc = accuracy(load_guide(name).net, x, y)
        card = json.loads(zoo.ZOO[name].location.with_suffix(".json").read_text())
        assert acc >= floor, name
        assert abs(acc - card["test_accuracy"]) < 1e-6, f"{name}: card says {card['test_accuracy']}, measured {acc}"


@needs_data
@needs("fashion-classifier")
@needs("fashion-ddpm")
def test_off_the_shelf_classifier_fails_on_noisy_inputs(test_set):
    """The premise of PPAP: the clean-trained classifier is near chance on x_t at mid noise."""
    x, y = test_set[0][:2000], test_set[1][:2000]
    schedule = load_diffusion("fashion-ddpm").schedule
    net = load_guide("fashion-classifier").net
    g = torch.Generator().manual_seed(0)
    clean = accuracy(net, x, y)
    noisy = accuracy(net, schedule.q_sample(x, torch.full((len(x),), 500), torch.randn(x.shape, generator=g)), y)
    assert clean > 0.9 and noisy < 0.3


def test_unknown_and_wrong_kind_names_are_clear():
    from ppap import PPAPError

    with pytest.raises(PPAPError, match="unknown zoo diffusion 'fashion-classifier'; valid: fashion-ddpm"):
        zoo.get("fashion-classifier", "diffusion")


@needs_data
@needs("fashion-segmenter")
@needs("fashion-edges")
def test_dense_zoo_models_match_their_cards(test_set):
    """The card figures are re-measured: segmenter pixel accuracy / mIoU, edge estimator L1."""
    from ppap.recipes import CLASSIFIER_RECIPES, test_figures

    x, y = test_set
    for name, key, floor in (("fashion-segmenter", "test_miou", 0.5), ("fashion-edges", "test_l1", None)):
        figures = test_figures(CLASSIFIER_RECIPES[name], load_guide(name).net, x, y)
        card = json.loads(zoo.ZOO[name].location.with_suffix(".json").read_text())
        assert abs(figures[key] - card[key]) < 1e-6, name
        if floor is not None:
            assert figures[key] >= floor
    assert figures["test_l1"] < 0.05


@needs_data
@needs("fashion-edges")
@needs("fashion-ddpm")
def test_off_the_shelf_dense_model_fails_on_noise(test_set):
    """Like MiDaS: the clean-trained edge estimator's map of x_t is far from the clean image's."""
    from ppap.models import sobel_magnitude

    x = test_set[0][:500]
    net = load_guide("fashion-edges").net
    schedule = load_diffusion("fashion-ddpm").schedule
    noisy = schedule.q_sample(x, torch.full((len(x),), 500), torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        clean_err = (net(x) - sobel_magnitude(x)).abs().mean()
        noisy_err = (net(noisy) - sobel_magnitude(x)).abs().mean()
    assert noisy_err > 3 * clean_err


def test_zoo_train_writes_to_the_working_folder_unless_told_to_replace_the_shipped_model(tmp_path, monkeypatch, capsys):
    """`ppap zoo train` never writes into the installed package by default: the model goes to
    --out (runs/zoo-models under the working directory by default), the package only with
    --into-package."""
    from ppap import recipes
    from ppap.cli import main

    written = []
    monkeypatch.setattr(recipes, "train_classifier", lambda name, out, work, data_dir=None: written.append((Path(out), Path(work))) or {})
    monkeypatch.chdir(tmp_path)
    assert main(["zoo", "train", "fashion-classifier"]) == 0
    assert main(["zoo", "train", "fashion-classifier", "--out", str(tmp_path / "mine"), "--work-dir", str(tmp_path / "w")]) == 0
    assert main(["zoo", "train", "fashion-classifier", "--into-package"]) == 0
    assert written == [
        (Path("runs/zoo-models/fashion-classifier.safetensors"), Path("runs/zoo/fashion-classifier")),
        (tmp_path / "mine" / "fashion-classifier.safetensors", tmp_path / "w" / "fashion-classifier"),
        (zoo.weights_dir() / "fashion-classifier.safetensors", Path("runs/zoo/fashion-classifier")),
    ]
    assert "wrote runs/zoo-models/fashion-classifier.safetensors" in capsys.readouterr().out
    assert main(["zoo", "list"]) == 0


def test_a_recipe_checkpoint_resumes_only_under_its_own_recipe(tmp_path):
    """A zoo recipe's checkpoint stores its recipe (tuples and all); a resume under the same one
    goes on, a DDPM may run longer, any other change is one line naming it."""
    import dataclasses

    from ppap.io import PPAPError, atomic_torch_save, load_resume_state
    from ppap.recipes import DDPMRecipe, _same_recipe

    r, ckpt = DDPMRecipe(), tmp_path / "work" / "ckpt.pt"
    atomic_torch_save(ckpt, {"recipe": dataclasses.asdict(r)})
    saved = load_resume_state(ckpt)["recipe"]
    ddpm_free = ("iterations", "checkpoint_every")  # what train_denoiser lets a DDPM's resume change
    _same_recipe(saved, r, ckpt, free=ddpm_free)
    _same_recipe(saved, dataclasses.replace(r, iterations=2 * r.iterations, checkpoint_every=10), ckpt, free=ddpm_free)
    with pytest.raises(PPAPError, match="iterations: 4000 there, 8000 here"):  # a guide's recipe may not
        _same_recipe(saved, dataclasses.replace(r, iterations=2 * r.iterations), ckpt)
    with pytest.raises(PPAPError) as e:
        _same_recipe(saved, dataclasses.replace(r, block_out_channels=(32, 64)), ckpt, free=ddpm_free)
    assert (
        str(e.value)
        == f"{ckpt} was made with another recipe (block_out_channels: [32, 64, 128] there, [32, 64] here); delete {ckpt.parent} to start over"
    )
