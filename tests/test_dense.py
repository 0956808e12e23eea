"""Dense guidance from the command line: targets from a reference image or a .npy map, composed
terms, and one-line errors for targets of the wrong shape or kind (tiny random models)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ppap.cli import main
from ppap.models import segmentation_labels, sobel_magnitude


def run(argv, capsys):
    code = main(["--threads", "1"] + argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dense_models(tiny_models):
    from ppap.models import tiny_dense

    root = tiny_models["root"]
    torch.manual_seed(2)
    save_file(tiny_dense(1).state_dict(), str(root / "edges.safetensors"))
    torch.manual_seed(3)
    save_file(tiny_dense(3).state_dict(), str(root / "seg.safetensors"))
    Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None] * 30, (8, 1))).save(root / "ref.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(root / "big.png")
    np.save(root / "edges.npy", np.random.default_rng(0).random((8, 8)).astype(np.float32))
    np.save(root / "labels.npy", np.random.default_rng(0).integers(0, 3, (2, 8, 8)))
    np.save(root / "bad_labels.npy", np.full((8, 8), 7))
    np.save(root / "wrong_shape.npy", np.zeros((6, 6), dtype=np.float32))
    base = [
        "sample",
        "--diffusion",
        tiny_models["diffusion"],
        "--num",
        "4",
        "--steps",
        "3",
        "--batch-size",
        "3",
        "--quiet",
        "--method",
        "naive",
    ]
    return tiny_models | {
        "base": base,
        "edges": ["--guide", "ppap.models:tiny_dense", "--guide-weights", str(root / "edges.safetensors"), "--task", "dense"],
        "seg": ["--guide", "ppap.models:tiny_segmenter", "--guide-weights", str(root / "seg.safetensors"), "--task", "segmentation"],
    }


def test_dense_targets_from_image_and_map_and_composed_terms(dense_models, capsys):
    m, root = dense_models, dense_models["root"]
    out = root / "s.png"
    code, _, err = run(m["base"] + m["edges"] + ["--target-image", str(root / "ref.png"), "--out", str(out)], capsys)
    assert code == 0, err
    data = np.load(out.with_suffix(".npz"))
    assert data["images"].shape == (4, 8, 8, 1) and data["targets"].shape == (4, 1, 8, 8)
    assert np.allclose(data["targets"][0], data["targets"][3])  # one reference, repeated
    code, _, err = run(
        m["base"]
        + m["seg"]
        + [
            "--target-map",
            str(root / "labels.npy"),
            "--out",
            str(out),
            "--term",
            f"guide=ppap.models:tiny_classifier,guide_weights={m['weights']},method=naive,target=7,scale=5",
            "--term",
            f"guide=ppap.models:tiny_dense,guide_weights={root / 'edges.safetensors'},task=dense,"
            f"method=naive,target_map={root / 'edges.npy'},scale=50",
        ],
        capsys,
    )
    assert code == 0, err
    data = np.load(out.with_suffix(".npz"))
    labels = np.load(root / "labels.npy")
    assert np.array_equal(data["targets"], labels[[0, 1, 0, 1]])  # a stack of maps is cycled
    assert data["targets_1"].tolist() == [7, 7, 7, 7] and data["targets_2"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target-map", "{root}/wrong_shape.npy"], "a dense target map must be float [B, 1, 8, 8] like the model output"),
        (["--target-image", "{root}/nope.png"], "reference image not found"),
        ([], "needs exactly one of --target-image or --target-map"),
        (["--target-map", "{root}/ref.png"], "--target-map must be a .npy file"),
    ],
)
def test_dense_target_errors_are_one_line(dense_models, capsys, extra, message):
    root = str(dense_models["root"])
    argv = dense_models["base"] + dense_models["edges"] + [e.format(root=root) for e in extra] + ["--out", f"{root}/never.png"]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message.format(root=root) in err, err
    assert not (dense_models["root"] / "never.png").exists()


def test_segmentation_label_out_of_range_and_classifier_with_map(dense_models, capsys):
    m, root = dense_models, str(dense_models["root"])
    code, _, err = run(m["base"] + m["seg"] + ["--target-map", f"{root}/bad_labels.npy", "--out", f"{root}/never.png"], capsys)
    assert code == 2 and "label 7 in the target map is out of range: the model has 3 classes" in err
    code, _, err = run(
        m["base"]
        + ["--guide", m["guide"], "--guide-weights", m["weights"], "--target-map", f"{root}/labels.npy", "--out", f"{root}/never.png"],
        capsys,
    )
    assert code == 2 and "a classifier takes --target CLASS" in err
    code, _, err = run(m["base"] + ["--term", "experts=x,target=1", "--out", f"{root}/never.png"], capsys)
    assert code == 2 and "has no guide=" in err
    code, _, err = run(
        m["base"] + ["--term", f"guide={m['guide']},guide_weights={m['weights']},target=1,scale=big", "--out", f"{root}/never.png"], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "bad guidance scale 'big': expected a number" in err


def test_reference_images_of_another_size_follow_the_fit_rule(dense_models, capsys):
    """A 16x16 reference for an 8x8 model is resized; the zoo's Fashion-MNIST DDPM pads 28x28
    references to 32x32 as its training images were padded."""
    from ppap.images import load_reference_image

    root = dense_models["root"]
    out = root / "big_ref.png"
    code, _, err = run(dense_models["base"] + dense_models["edges"] + ["--target-image", str(root / "big.png"), "--out", str(out)], capsys)
    assert code == 0, err
    Image.fromarray(np.full((28, 28), 255, dtype=np.uint8)).save(root / "fm.png")
    padded = load_reference_image(root / "fm.png", (1, 32, 32), fit="pad")
    assert padded.shape == (1, 1, 32, 32)
    assert (padded[0, 0, 2:30, 2:30] == 1).all() and padded[0, 0, :2].eq(-1).all() and padded[0, 0, :, 30:].eq(-1).all()
    rgb = load_reference_image(root / "fm.png", (3, 16, 16))  # grey to RGB, resized
    assert rgb.shape == (1, 3, 16, 16) and torch.allclose(rgb, torch.ones_like(rgb))


def test_default_scale_is_the_zoo_experts_measured_best():
    import copy

    from ppap import zoo
    from ppap.config import default_scale
    from ppap.loading import load_experts, load_guide, load_pipeline

    experts = [e for e in zoo.ZOO.values() if e.kind == "experts"]
    assert experts and all(e.scale is not None for e in experts)  # every shipped bank says how hard to guide with it
    pipe = load_pipeline("fashion-ddpm")
    guide = load_guide("fashion-classifier")
    bank = load_experts("fashion-ppap5", copy.deepcopy(guide), pipe.diffusion)
    assert bank.default_scale == zoo.ZOO["fashion-ppap5"].scale
    assert pipe.guidance_term(2, guide=guide, experts=bank).scale == bank.default_scale
    assert pipe.guidance_term(2, guide=guide, method="naive").scale == default_scale("classification", "naive")  # the bank's is for ppap
    assert pipe.guidance_term(2, guide=guide, experts=bank, classifier_scale=12.5).scale == 12.5  # an explicit scale wins


def test_ground_truth_maps():
    x = -torch.ones(2, 1, 4, 4)
    x[:, :, 1:3, 1:3] = 1.0
    labels = segmentation_labels(x, torch.tensor([0, 9]))
    assert labels[0].unique().tolist() == [0, 1] and labels[1].unique().tolist() == [0, 10]
    edges = sobel_magnitude(x)
    assert edges.shape == x.shape and edges[0, 0, 0, 0] > 0 and edges.max() <= 1.5
    assert torch.allclose(sobel_magnitude(torch.zeros(1, 1, 5, 5)), torch.zeros(1, 1, 5, 5), atol=1e-5)
