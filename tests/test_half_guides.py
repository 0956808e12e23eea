"""Guides in float16 / bfloat16 on the CPU: input cast to the guide's dtype, float32 outputs
and gradients (the sampler's), and expert banks that recognise a half-precision copy of the
guide they were trained on."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ppap import Classification, GuideModel, LoRAExperts, PPAPError, TimestepRouter, load_bank, save_bank
from ppap.models import tiny_classifier

from tiny_hf import tiny_resnet, tiny_vit

GUIDES = {
    "tiny classifier": lambda: GuideModel(tiny_classifier().eval()),
    "transformers resnet": lambda: GuideModel.from_transformers(tiny_resnet().eval()),
    "transformers vit": lambda: GuideModel.from_transformers(tiny_vit().eval()),
}


def _grad(fn, x, y):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    return out, torch.autograd.grad(out.log_softmax(-1)[torch.arange(len(y)), y].sum(), x)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(GUIDES))
def test_half_precision_guides_give_float32_gradients_close_to_float32(name, dtype):
    torch.manual_seed(0)
    guide = GUIDES[name]()
    x, y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, torch.tensor([1, 2, 3, 4])
    out32, g32 = _grad(guide, x, y)
    half = copy.deepcopy(guide).to(dtype)
    assert next(half.net.parameters()).dtype == dtype
    out, g = _grad(half, x, y)
    assert out.dtype == g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    assert (out - out32).abs().max() < 0.02 * out32.abs().max()
    assert F.cosine_similarity(g.flatten(), g32.flatten(), dim=0) > 0.99 and (g - g32).norm() < 0.2 * g32.norm()


def _saved_bank(tmp_path, tiny_diffusion):
    torch.manual_seed(0)
    guide = GuideModel(tiny_classifier().eval())
    bank = LoRAExperts(copy.deepcopy(guide), TimestepRouter.uniform(2, 100))
    with torch.no_grad():
        for i in range(2):
            for p in bank.trainable_parameters(i):
                p.add_(0.05 * torch.randn_like(p))
    save_bank(bank, tmp_path / "bank", Classification(10), tiny_diffusion.schedule)
    return guide, bank.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_bank_loads_on_a_half_precision_copy_of_its_guide(tmp_path, tiny_diffusion, dtype):
    guide, bank = _saved_bank(tmp_path, tiny_diffusion)
    half = load_bank(copy.deepcopy(guide).to(dtype), tmp_path / "bank", schedule=tiny_diffusion.schedule)
    x, y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, torch.tensor([1, 2, 3, 4])
    for t in (10, 90):
        out32, g32 = _grad(lambda v, t=t: bank(v, torch.tensor(t)), x, y)
        out, g = _grad(lambda v, t=t: half(v, torch.tensor(t)), x, y)
        assert out.dtype == g.dtype == torch.float32 and bool(torch.isfinite(g).all())
        assert F.cosine_similarity(g.flatten(), g32.flatten(), dim=0) > 0.99
    torch.manual_seed(1)  # another network is still refused, at any precision
    with pytest.raises(PPAPError, match="were trained on"):
        load_bank(GuideModel(tiny_classifier()).to(dtype), tmp_path / "bank")


def test_a_bank_trained_on_a_bfloat16_guide_loads_on_the_float32_original(tmp_path, tiny_diffusion):
    torch.manual_seed(0)
    guide = GuideModel(tiny_classifier().eval())
    bank = LoRAExperts(copy.deepcopy(guide).to(torch.bfloat16), TimestepRouter.uniform(2, 100))
    save_bank(bank, tmp_path / "bank", Classification(10), tiny_diffusion.schedule)
    load_bank(copy.deepcopy(guide), tmp_path / "bank")
    with pytest.raises(PPAPError, match="were trained on"):  # float16 and bfloat16 roundings are not comparable
        load_bank(copy.deepcopy(guide).to(torch.float16), tmp_path / "bank")


def test_the_zoo_bank_loads_on_a_bfloat16_copy_of_its_guide():
    from ppap import zoo
    from ppap.loading import load_diffusion, load_experts, load_guide

    if not (zoo.ZOO["fashion-ppap5"].available and zoo.ZOO["fashion-ddpm"].available):
        pytest.skip("zoo models not built in this checkout")
    diffusion = load_diffusion("fashion-ddpm")
    guide = load_guide("fashion-classifier")
    bank = load_experts("fashion-ppap5", copy.deepcopy(guide), diffusion)
    half = load_experts("fashion-ppap5", copy.deepcopy(guide).to(torch.bfloat16), diffusion)
    x, y = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1, torch.tensor([1, 2, 3, 4])
    out32, g32 = _grad(lambda v: bank(v, torch.tensor(500)), x, y)
    out, g = _grad(lambda v: half(v, torch.tensor(500)), x, y)
    assert out.dtype == g.dtype == torch.float32 and F.cosine_similarity(g.flatten(), g32.flatten(), dim=0) > 0.98


def test_a_manifest_without_half_precision_fingerprints_says_how_to_load_on_a_half_guide(tmp_path, tiny_diffusion):
    import json

    guide, bank = _saved_bank(tmp_path, tiny_diffusion)
    path = tmp_path / "bank" / "ppap_experts.json"
    manifest = json.loads(path.read_text())
    del manifest["guide_fingerprints"]  # as banks saved with only the float32 fingerprint
    path.write_text(json.dumps(manifest))
    with pytest.raises(PPAPError, match=r"record no bfloat16 fingerprint of their guide .*bank.to\(torch.bfloat16\)"):
        load_bank(copy.deepcopy(guide).to(torch.bfloat16), tmp_path / "bank")
    half = load_bank(copy.deepcopy(guide), tmp_path / "bank").to(torch.bfloat16)  # the way out the message gives
    x, y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, torch.tensor([1, 2, 3, 4])
    g32 = _grad(lambda v: bank(v, torch.tensor(90)), x, y)[1]
    g = _grad(lambda v: half(v, torch.tensor(90)), x, y)[1]
    assert g.dtype == torch.float32 and F.cosine_similarity(g.flatten(), g32.flatten(), dim=0) > 0.99
