"""GuideModel: off-the-shelf nets on diffusion images in [-1, 1], checked against the nets' own
image processors, on tiny random transformers models (tests/tiny_hf.py)."""

from __future__ import annotations

import copy
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import ConvNextImageProcessor, DeiTImageProcessor, ViTImageProcessor
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ppap.guide_model import GuideModel
from ppap.io import PPAPError

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import FASHION_MNIST, tiny_dpt, tiny_resnet, tiny_segformer, tiny_vit  # noqa: E402

IMAGE = Path(__file__).resolve().parents[1] / "docs/examples/ref-t-shirt.png"
STEP = 1 / 255 / min(IMAGENET_DEFAULT_STD)  # one 8-bit level after ImageNet normalisation


@pytest.fixture(scope="module")
def pil() -> Image.Image:
    return Image.open(IMAGE).convert("RGB")  # a real 32x32 grey Fashion-MNIST image, as RGB


def to_x(pil: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1], the diffusion convention."""
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 127.5 - 1


def imagenet_processor(size: int, **kw) -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD, **kw)


def rand_x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# 1. preprocessing == the image processor's own output


def test_preprocess_equals_processor_rgb_and_grey(pil):
    processor = imagenet_processor(32)
    ref = processor(images=pil, return_tensors="pt").pixel_values
    g = GuideModel.from_transformers(tiny_vit(), processor)
    x = to_x(pil)
    assert ref.shape == (1, 3, 32, 32) and ref.std() > 0.5  # non-trivial: a real image, ImageNet stats
    torch.testing.assert_close(g.preprocess(x), ref, atol=1e-5, rtol=0)
    grey = x[:, :1]  # the image is grey: its RGB channels are equal
    assert torch.equal(grey.expand(-1, 3, -1, -1), x)
    torch.testing.assert_close(g.preprocess(grey), ref, atol=1e-5, rtol=0)


def test_preprocess_resize_close_to_processor(pil):
    """32 -> 48 bilinear. PIL resizes the 8-bit image and rounds the result to uint8, ppap
    resizes floats (it must, to stay differentiable): they differ by up to one 8-bit level
    (1/255 / std), not 1e-5. The kernels themselves agree (antialiased bilinear = PIL's)."""
    processor = imagenet_processor(48)
    ref = processor(images=pil, return_tensors="pt").pixel_values
    out = GuideModel.from_transformers(tiny_resnet(), processor).preprocess(to_x(pil))
    assert out.shape == ref.shape == (1, 3, 48, 48)
    err = (out - ref).abs()
    assert err.max() <= 1.1 * STEP, (err.max(), STEP)
    assert err.mean() <= 0.3 * STEP  # most pixels within rounding error, not merely bounded


def test_forgetting_the_shift_is_far_off(pil):
    """The common bug, (x - mean) / std on x in [-1, 1], is nowhere near the processor."""
    ref = imagenet_processor(32)(images=pil, return_tensors="pt").pixel_values
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    assert ((to_x(pil) - mean) / std - ref).abs().max() > 4


def test_processor_fields(pil):
    x = to_x(pil)
    # do_normalize=False: the net takes x01 in [0, 1]
    g = GuideModel.from_transformers(tiny_vit(), imagenet_processor(32, do_normalize=False))
    torch.testing.assert_close(g.preprocess(x), (x + 1) / 2, atol=1e-6, rtol=0)
    # do_rescale=False: the net sees (0..255 - mean) / std, folded into mean/std in [0, 1] units
    p = imagenet_processor(32, do_rescale=False)
    ref = p(images=pil, return_tensors="pt").pixel_values
    assert ref.abs().max() > 100
    torch.testing.assert_close(GuideModel.from_transformers(tiny_vit(), p).preprocess(x), ref, atol=1e-3, rtol=1e-5)
    # shortest_edge -> square; resample 3 -> bicubic
    g = GuideModel.from_transformers(tiny_resnet(), ConvNextImageProcessor(size={"shortest_edge": 24}))
    assert (g.input_size, g.resize, g.mean) == ((24, 24), "bicubic", (0.5, 0.5, 0.5))
    # do_center_crop: the whole image is resized to crop_size
    g = GuideModel.from_transformers(
        tiny_resnet(), DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 20, "width": 28})
    )
    assert g.input_size == (20, 28) and g.preprocess(x).shape == (1, 3, 20, 28)
    # no processor: config.image_size (none for ResNet) and ImageNet's default mean/std
    g = GuideModel.from_transformers(tiny_vit())
    assert (g.input_size, g.mean, g.std) == ((32, 32), tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert GuideModel.from_transformers(tiny_resnet()).input_size is None


# 2. output reading


def test_classifier_outputs_and_classes():
    x = rand_x(2, 1, 32, 32)
    for model in (tiny_resnet(), tiny_vit()):
        g = GuideModel.from_transformers(model)
        out = g(x)
        assert type(out) is torch.Tensor and out.shape == (2, 10) and g.task == "classification"
        assert model.training  # the guide ran it in eval mode for the call only
        torch.testing.assert_close(out, model.eval()(g.preprocess(x)).logits)
    assert GuideModel.from_transformers(tiny_resnet()).classes is None  # LABEL_0.. are not names
    g = GuideModel.from_transformers(tiny_resnet(labels=FASHION_MNIST))
    assert g.classes == FASHION_MNIST and g.classes[9] == "Ankle boot"


def test_segformer_logits_upsampled_to_x():
    model = tiny_segformer(num_labels=4)
    g = GuideModel.from_transformers(model, imagenet_processor(32))
    x = rand_x(2, 3, 16, 16)  # the diffusion model's size, below the net's
    raw = model.eval()(g.preprocess(x)).logits
    assert raw.shape == (2, 4, 8, 8)  # SegFormer's logits are at 1/4 of its 32 x 32 input
    out = g(x)
    assert out.shape == (2, 4, 16, 16) and g.task == "segmentation"
    torch.testing.assert_close(out, F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False))
    g.dense_size = None
    assert g(x).shape == (2, 4, 8, 8)
    g.dense_size = (5, 7)
    assert g(x).shape == (2, 4, 5, 7)


def test_dpt_depth_gets_a_channel():
    model = tiny_dpt()
    g = GuideModel.from_transformers(model)
    x = rand_x(2, 1, 32, 32)
    raw = model(g.preprocess(x)).predicted_depth
    assert raw.shape == (2, 32, 32)  # no channel dim
    out = g(x)
    assert out.shape == (2, 1, 32, 32) and g.task == "dense" and g.output == "predicted_depth"
    torch.testing.assert_close(out, raw[:, None])
    assert g(rand_x(3, 3, 24, 24)).shape == (3, 1, 24, 24)  # resized to 32 for the net, back to 24


# 3. gradients reach x and point uphill


def ascend(g: GuideModel, x: torch.Tensor, objective) -> tuple[float, float]:
    """The objective before and after one small step along its gradient w.r.t. x."""
    x = x.clone().requires_grad_(True)
    value = objective(g(x))
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    with torch.no_grad():
        after = objective(g(x + 1e-2 * grad / grad.abs().max()))
    return value.item(), after.item()


def test_classifier_gradient_raises_target_logprob():
    x, target = rand_x(2, 3, 32, 32), torch.tensor([3, 7])
    for model in (tiny_resnet(), tiny_vit()):
        g = GuideModel.from_transformers(model, imagenet_processor(32))
        before, after = ascend(g, x, lambda o: o.log_softmax(1).gather(1, target[:, None]).sum())
        assert after > before + 1e-4, (type(model).__name__, before, after)


def test_segmentation_gradient_raises_label_map_logprob():
    g = GuideModel.from_transformers(tiny_segformer(num_labels=4))
    labels = torch.randint(0, 4, (2, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    before, after = ascend(g, rand_x(2, 3, 32, 32), lambda o: o.log_softmax(1).gather(1, labels).mean())
    assert after > before + 1e-5, (before, after)


def test_depth_gradient_moves_towards_target():
    g = GuideModel.from_transformers(tiny_dpt())
    target = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    before, after = ascend(g, rand_x(2, 1, 32, 32), lambda o: -(o - target).abs().mean())
    assert after > before + 1e-5, (before, after)


# 4. forward(x, net=other)


def test_forward_with_another_net():
    g = GuideModel.from_transformers(tiny_segformer().eval(), imagenet_processor(32))  # net= runs in its own mode
    x = rand_x(2, 3, 16, 16)
    assert torch.equal(g(x, net=None), g(x)) and torch.equal(g(x, net=g.net), g(x))
    other = copy.deepcopy(g.net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = g(x, net=other)
    assert out.shape == g(x).shape == (2, 4, 16, 16) and not torch.allclose(out, g(x))
    torch.testing.assert_close(out, GuideModel.from_transformers(other, imagenet_processor(32))(x))


def test_forward_with_peft_lora_copy():
    from peft import LoraConfig, get_peft_model

    g = GuideModel.from_transformers(tiny_vit(), imagenet_processor(32))
    x = rand_x(2, 3, 32, 32)
    expert = get_peft_model(copy.deepcopy(g.net), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(g(x, net=expert), g(x))  # LoRA B starts at zero
    with torch.no_grad():
        for name, p in expert.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    assert not torch.allclose(g(x, net=expert), g(x))
    assert all(p.requires_grad for p in g.net.parameters())  # the guide's own net is left as it was


# 5. identity normalisation


class Recorder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x.mean((1, 2, 3))[:, None]


def test_identity_normalisation():
    x = rand_x(2, 3, 32, 32)
    g = GuideModel(Recorder())
    assert torch.equal(g.preprocess(x), x)
    g = GuideModel(Recorder(), input_size=64, mean=(0.5,), std=(0.5,))  # 0.5/0.5 is the [-1, 1] convention
    g(x)
    assert torch.equal(g.net.seen, F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True))
    # antialiasing only changes downsampling: upsampled, it is plain bilinear
    torch.testing.assert_close(g.net.seen, F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
    ident = g.identity
    assert json.loads(json.dumps(ident)) == ident
    assert ident | {"ref": None} == {
        "ref": None,
        "net": "Recorder",
        "input_size": [64, 64],
        "resize": "bilinear",
        "mean": [0.5],
        "std": [0.5],
        "in_channels": None,
        "output": None,
        "task": None,
    }
    assert g.net.training is True  # the net's mode is its owner's: it ran in eval mode for the call only


def test_rgb_to_grey_uses_luma():
    g = GuideModel(Recorder(), in_channels=1)
    x = rand_x(1, 3, 8, 8)
    g(x)
    torch.testing.assert_close(g.net.seen, 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])


# 6. errors


def test_errors_name_the_bad_value():
    from transformers import ResNetConfig, ResNetModel

    headless = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    with pytest.raises(PPAPError, match=r"ResNetModel.*task="):
        GuideModel.from_transformers(headless)
    g = GuideModel.from_transformers(headless, task="dense")
    g.output = "last_hidden_state"  # task= on an unknown class: its output field is set by hand
    assert g(rand_x(1, 3, 32, 32)).shape == (1, 16, 32, 32)
    with pytest.raises(PPAPError, match=r"\(1, 2, 8, 8\)"):
        GuideModel(Recorder())(rand_x(1, 2, 8, 8))
    with pytest.raises(PPAPError, match=r"\(2, 8, 8\)"):
        GuideModel(Recorder())(rand_x(2, 8, 8))
    with pytest.raises(PPAPError, match="'lanczos'"):
        GuideModel(Recorder(), resize="lanczos")
    with pytest.raises(PPAPError, match="'detection'"):
        GuideModel(Recorder(), task="detection")
    with pytest.raises(PPAPError, match="'logitz'"):
        GuideModel(tiny_resnet(), output="logitz")(rand_x(1, 3, 32, 32))
    with pytest.raises(PPAPError, match="std=None"):
        GuideModel(Recorder(), mean=(0.5,))
    assert issubclass(PPAPError, ValueError)


# 7. timm / torchvision (not importable on the CPU test machine), plus their documented APIs stubbed


def import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # torchvision beside a CPU-only torch raises RuntimeError, not ImportError
        pytest.skip(f"{name} cannot be imported: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def test_from_timm_real():
    timm = import_or_skip("timm")
    g = GuideModel.from_timm(timm.create_model("resnet18", pretrained=False, num_classes=10))
    assert g.input_size == (224, 224) and g.task == "classification" and len(g.mean) == 3
    assert g(rand_x(1, 1, 32, 32)).shape == (1, 10)


def test_from_torchvision_real():
    tvm = import_or_skip("torchvision.models")
    g = GuideModel.from_torchvision(tvm.resnet18(weights=None), tvm.ResNet18_Weights.IMAGENET1K_V1)
    assert g.input_size == (224, 224) and len(g.classes) == 1000 and g(rand_x(1, 3, 32, 32)).shape == (1, 1000)
    seg = tvm.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    g = GuideModel.from_torchvision(seg)
    assert (g.task, g.output) == ("segmentation", "out") and g(rand_x(1, 3, 32, 32)).shape == (1, 4, 32, 32)


class Convnet(nn.Module):
    def __init__(self, k: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 3, padding=1)

    def forward(self, x: torch.Tensor):
        return self.conv(x).mean((2, 3))


def test_from_timm_stub(monkeypatch):
    """timm's documented ``resolve_data_config({}, model=...)`` dict, stubbed."""
    cfg = {
        "input_size": (3, 40, 40),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
    }
    timm = types.ModuleType("timm")
    timm.data = types.SimpleNamespace(resolve_data_config=lambda args, model: cfg)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", timm.data)
    g = GuideModel.from_timm(Convnet())
    assert (g.input_size, g.resize, g.in_channels, g.task, g.output) == ((40, 40), "bicubic", 3, "classification", None)
    assert g(rand_x(2, 1, 32, 32)).shape == (2, 5)


def test_from_torchvision_stub():
    """torchvision's documented weights API (transforms(), meta) and segmentation dict output, stubbed."""

    class SegNet(Convnet):
        def forward(self, x):
            return {"out": self.conv(x), "aux": self.conv(x)}

    SegNet.__module__ = "torchvision.models.segmentation.fake"
    weights = types.SimpleNamespace(
        transforms=lambda: types.SimpleNamespace(
            resize_size=[48], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation=types.SimpleNamespace(value="bilinear")
        ),
        meta={"categories": ["bg", "a", "b", "c", "d"]},
    )
    g = GuideModel.from_torchvision(SegNet(), weights)
    assert (g.task, g.output, g.input_size, g.classes[0]) == ("segmentation", "out", (48, 48), "bg")
    assert g(rand_x(2, 3, 32, 32)).shape == (2, 5, 32, 32)
    with pytest.raises(PPAPError, match="task="):
        GuideModel.from_torchvision(Convnet())  # not a torchvision class: its task is unknown
