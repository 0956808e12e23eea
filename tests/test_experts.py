import pytest
import torch
from torch import nn

from ppap import AdapterConfig, Classification, FullExperts, LoRAExperts, PPAPError, TimestepRouter, TrainConfig, train_experts
from ppap.bank_format import parameter_report
from ppap.io import atomic_save_safetensors
from ppap.models import tiny_classifier


def _bank(n=3, per_expert_norm=True, seed=0):
    torch.manual_seed(seed)
    return LoRAExperts(tiny_classifier(), TimestepRouter.uniform(n, 100), AdapterConfig(rank=4, alpha=4, per_expert_norm=per_expert_norm))


def test_fresh_experts_equal_the_off_the_shelf_model():
    bank = _bank().eval()
    x = torch.randn(6, 1, 8, 8)
    t = torch.tensor([0, 40, 99, 10, 70, 50])
    assert torch.allclose(bank(x, t), bank.teacher(x), atol=1e-5)


def test_every_adapter_gets_a_gradient_and_only_its_own():
    bank = _bank().train()
    for i in range(3):  # as the training loop does for the expert it trains: here, every one
        for p in bank.trainable_parameters(i):
            p.requires_grad_(True)
    out = bank.run_expert(1, torch.randn(4, 1, 8, 8))
    out.square().sum().backward()
    for i in range(3):
        grads = [p.grad for p in bank.trainable_parameters(i)]
        if i == 1:
            # LoRA B starts at zero, so A gets none at init; B and the norm copies must
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)
    assert all(p.grad is None for n, p in bank.named_parameters() if "lora_" not in n and "modules_to_save" not in n)


def test_routing_sends_each_sample_to_its_expert():
    bank = _bank()
    with torch.no_grad():  # make the experts differ
        for i in range(3):
            for p in bank.trainable_parameters(i):
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    bank.eval()
    x = torch.randn(5, 1, 8, 8)
    t = torch.tensor([5, 50, 95, 32, 33])  # boundaries (0, 33, 66, 100): experts 0, 1, 2, 0, 1
    out = bank(x, t)
    for k, i in enumerate([0, 1, 2, 0, 1]):
        assert torch.allclose(out[k], bank.run_expert(i, x[k : k + 1])[0], atol=1e-5)


@pytest.mark.parametrize("per_expert_norm", [True, False])
def test_backbone_bit_identical_after_training_and_kd_loss_decreases(tiny_diffusion, tmp_path, per_expert_norm):
    bank = _bank(n=2, per_expert_norm=per_expert_norm)
    before = {k: v.clone() for k, v in bank.base_state().items()}
    assert any("running_mean" in k for k in before)  # BatchNorm statistics are part of the check
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    cfg = TrainConfig(
        experts="2", rank=4, alpha=4, iterations=40, batch_size=16, lr=1e-2, per_expert_norm=per_expert_norm, warm_start=False
    )  # each expert from the teacher: its own loss must halve
    # a sharpened teacher (tau 0.25), so that the student starts away from its target: at tau 1 a
    # LoRA student (zero-initialised update) starts at the teacher's own softmax, its loss near 0
    task = Classification(10, tau=0.25)
    stats = train_experts(bank, task, tiny_diffusion.schedule, images, cfg, tmp_path, progress=False)
    after = bank.base_state()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for s in stats.values():
        assert s["loss_last"] < 0.5 * s["loss_first"]
    # the experts did move away from the teacher
    x = images[:8]
    assert not torch.allclose(bank.eval().run_expert(0, x), bank.teacher(x), atol=1e-3)


def test_save_load_round_trip_and_bad_adapter_files(tmp_path):
    bank = _bank()
    with torch.no_grad():
        for p in bank.trainable_parameters(2):
            p.add_(torch.randn_like(p))
    import os

    old_umask = os.umask(0o022)
    try:
        bank.save_expert(2, tmp_path)
        atomic_save_safetensors(tmp_path / "one.safetensors", {"w": torch.zeros(2)})  # ppap's own writer, alike
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in (tmp_path / "expert_2").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "expert_2").iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}  # others can read a shared bank
    assert (tmp_path / "one.safetensors").stat().st_mode & 0o777 == 0o644
    other = _bank()
    other.load_expert(2, tmp_path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(other.eval().run_expert(2, x), bank.eval().run_expert(2, x), atol=1e-6)

    (tmp_path / "expert_2" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PPAPError, match="corrupt or not safetensors"):
        other.load_expert(2, tmp_path)
    with pytest.raises(PPAPError, match="weights file not found"):
        other.load_expert(1, tmp_path)
    bank.save_expert(0, tmp_path)
    wrong_rank = LoRAExperts(tiny_classifier(), TimestepRouter.uniform(3, 100), AdapterConfig(rank=2, alpha=2))
    with pytest.raises(PPAPError, match="does not fit the guidance model"):
        wrong_rank.load_expert(0, tmp_path)


def test_sequential_models_and_parameter_report():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    backbone = sum(p.numel() for p in net.parameters())
    bank = LoRAExperts(net, TimestepRouter.uniform(12, 100), AdapterConfig(rank=2, alpha=2))
    report = parameter_report(bank)
    lora = (2 * 1 * 9 + 4 * 2) + (2 * 256 + 10 * 2)  # conv A [r, in*k*k], B [out, r]; linear A, B
    assert report["trainable_per_expert"] == lora + 8  # + the BatchNorm affine copy
    assert report["backbone_parameters"] == backbone
    assert report["fraction_per_expert"] == pytest.approx((lora + 8) / backbone)


def test_full_experts_are_independent_copies(tiny_diffusion, tmp_path):
    torch.manual_seed(0)
    bank = FullExperts(tiny_classifier(), TimestepRouter.uniform(2, 100))
    before = {k: v.clone() for k, v in bank.base_state().items()}
    images, labels = torch.rand(32, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (32,))
    cfg = TrainConfig(objective="supervised", adapter="full", experts="2", iterations=5, batch_size=8)
    train_experts(bank, Classification(10), tiny_diffusion.schedule, images, cfg, tmp_path, labels=labels, progress=False)
    assert all(torch.equal(before[k], v) for k, v in bank.base_state().items())
    assert (tmp_path / "expert_1" / "model.safetensors").exists()
    assert parameter_report(bank)["fraction_per_expert"] == 1.0
    # two experts, two trainings: no shared tensor, different weights, different outputs
    e0, e1 = bank.experts["expert_0"], bank.experts["expert_1"]
    assert not {p.data_ptr() for p in e0.parameters()} & {p.data_ptr() for p in e1.parameters()}
    assert any(not torch.equal(a, b) for a, b in zip(e0.state_dict().values(), e1.state_dict().values()))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert not torch.allclose(bank.eval().run_expert(0, x), bank.run_expert(1, x))
    with torch.no_grad():  # changing one expert leaves the other alone
        out1 = bank.run_expert(1, x)
        next(e0.parameters()).add_(1.0)
        assert torch.equal(bank.run_expert(1, x), out1)


def test_merged_experts_guide_like_unmerged_and_restore_the_backbone_exactly():
    """Inference merges the routed expert's LoRA into the weights (the cost of a naive forward);
    the guidance equals the unmerged one to 1e-5 and the backbone comes back bit for bit."""
    from ppap import NoisyInputGuidance

    bank = _bank(3)
    with torch.no_grad():
        for name, p in bank.model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    base = {k: v.clone() for k, v in bank.base_state().items()}
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4])
    grads = {}
    for merge in (False, True):
        bank.merge = merge
        guide = NoisyInputGuidance(bank.eval(), Classification(10), y, 1.0)
        grads[merge] = [guide(x, torch.full((4,), t), None) for t in (10, 50, 90, 10)]
        if merge:
            assert bank._merged == 0  # the last call left expert 0 merged
    for a, b in zip(grads[False], grads[True]):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-5)
    assert all(torch.equal(base[k], v) for k, v in bank.base_state().items())
    bank.train()  # training always sees separate LoRA branches
    assert bank._merged is None


def test_soft_routing_blends_neighbours_near_a_boundary_only():
    bank = _bank()  # boundaries (0, 33, 66, 100)
    with torch.no_grad():
        for i in range(3):
            for p in bank.trainable_parameters(i):
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    bank.eval()
    x = torch.randn(2, 1, 8, 8)
    f = [bank.run_expert(i, x) for i in range(3)]
    bank.blend = 10  # 5 timesteps either side of 33 and 66
    at = lambda t: bank(x, torch.full((2,), t))  # noqa: E731
    assert torch.allclose(at(33), (f[0] + f[1]) / 2, atol=1e-5)  # on the boundary: half each
    assert torch.allclose(at(35), 0.7 * f[1] + 0.3 * f[0], atol=1e-5)  # 2 inside expert 1: weight 0.5 - 2/10 on expert 0
    assert torch.allclose(at(32), 0.6 * f[0] + 0.4 * f[1], atol=1e-5)  # 1 below it (hi - t = 1)
    assert torch.allclose(at(50), f[1], atol=1e-6) and torch.allclose(at(2), f[0], atol=1e-6)  # far from a boundary: one expert
    assert torch.allclose(at(99), f[2], atol=1e-6)  # no neighbour above the last expert
    bank.blend = 0
    assert torch.allclose(at(33), f[1], atol=1e-6)


def test_soft_routing_gradient_with_merged_experts_equals_unmerged():
    """Blending two experts in one autograd graph must not merge weights in place under it."""
    bank = _bank()
    with torch.no_grad():
        for i in range(3):
            for p in bank.trainable_parameters(i):
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    bank.eval()
    bank.blend = 10
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 35)
    grads = []
    for merge in (True, False):
        bank.merge = merge
        xr = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(bank(xr, t).log_softmax(-1)[:, 3].sum(), xr)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0].abs().sum() > 0


def _perturbed_bank(n=3):
    bank = _bank(n)
    with torch.no_grad():  # experts that differ from each other and from the teacher
        for i in range(n):
            for p in bank.trainable_parameters(i):
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    return bank.eval()


def test_gradient_of_a_batch_spanning_several_experts_equals_each_sample_alone():
    """A merged bank in eval mode on a batch whose timesteps span experts: the backward pass
    through every expert's part is each sample's own gradient (experts run one at a time,
    merged). So is a sum over two calls on different experts, kept alive together."""
    bank = _perturbed_bank()
    x, y, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 50, 95, 10])

    def grad(xs, ts, ys):
        xs = xs.clone().requires_grad_(True)
        return torch.autograd.grad(bank(xs, ts).log_softmax(-1)[torch.arange(len(ys)), ys].sum(), xs)[0]

    mixed = grad(x, t, y)
    alone = torch.cat([grad(x[k : k + 1], t[k : k + 1], y[k : k + 1]) for k in range(4)])
    assert alone.abs().sum() > 0 and torch.allclose(mixed, alone, atol=1e-5)
    xa, xb = x[:2].clone().requires_grad_(True), x[2:].clone().requires_grad_(True)
    two_calls = bank(xa, torch.tensor(5)).logsumexp(-1).sum() + bank(xb, torch.tensor(95)).logsumexp(-1).sum()
    ga, gb = torch.autograd.grad(two_calls, (xa, xb))  # expert 0's graph outlived the switch to expert 2
    for xs, ts, g in ((x[:2], 5, ga), (x[2:], 95, gb)):
        xs = xs.clone().requires_grad_(True)
        assert torch.allclose(torch.autograd.grad(bank(xs, torch.tensor(ts)).logsumexp(-1).sum(), xs)[0], g, atol=1e-6)


def _bytes_held(module: nn.Module) -> int:
    """Bytes of every tensor the modules hold, registered or not (each storage once)."""
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for m in module.modules():
        visit(vars(m))
    return sum(storages.values())


def test_a_merged_bank_holds_one_merged_copy_at_most_and_deep_copies():
    """Merging keeps the backbone's own weights aside only while merged (nothing hidden after),
    and a deep copy of a merged bank switches experts and answers like the original."""
    import copy

    bank = _perturbed_bank()
    base = {k: v.clone() for k, v in bank.base_state().items()}
    x = torch.randn(2, 1, 8, 8)
    fresh = _bytes_held(bank)
    from peft.tuners.lora import LoraLayer

    adapted = sum(m.get_base_layer().weight.nbytes for m in bank.modules() if isinstance(m, LoraLayer))
    bank(x, torch.tensor(5))  # expert 0 merged
    assert _bytes_held(bank) == fresh + adapted  # the merged copy: no more
    bank.train().eval()  # unmerged
    assert _bytes_held(bank) == fresh
    want = {t: bank(x, torch.tensor(t)) for t in (5, 95, 50)}  # expert 1 left merged
    twin = copy.deepcopy(bank)
    for t in (50, 95, 5, 50):
        assert torch.equal(twin(x, torch.tensor(t)), want[t])
    assert torch.equal(bank(x, torch.tensor(95)), want[95])
    for b in (bank, twin):
        assert all(torch.equal(base[k], v) for k, v in b.base_state().items())


def _lora_weights(bank):
    """LoRA layer name -> (layer, its base layer's current weight)."""
    return {n: (m, m.get_base_layer().weight) for n, m in bank._lora_layers().items()}


def _grouped_bank():
    """A bank on a net with a Linear, ungrouped 3x3 and 1x1 convs and a grouped conv, with
    experts that differ from each other and from the teacher."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 6, 1), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))
    bank = LoRAExperts(net, TimestepRouter.uniform(3, 100), AdapterConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in bank.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + p.numel())))
    return bank.eval()


def _delta(layer, adapter):
    """scaling * B A as the weight of a Linear or ungrouped conv, from the definition: the LoRA
    branch's response to each input unit (for a conv: a kernel-sized input, one unit on)."""
    base = layer.get_base_layer()
    branch = lambda v: layer.lora_B[adapter](layer.lora_A[adapter](v)) * layer.scaling[adapter]  # noqa: E731
    if isinstance(base, nn.Linear):
        return branch(torch.eye(base.in_features)).T
    probes = torch.eye(base.weight[0].numel()).view(-1, *base.weight.shape[1:])  # [in * kh * kw, in, kh, kw]
    return branch(probes)[:, :, 0, 0].T.reshape(base.weight.shape)


def test_a_switch_merges_the_new_experts_delta_alone_and_never_writes_the_backbone():
    """Expert i merged after expert j: each adapted weight is the backbone's W + scaling * B_i A_i
    (nothing of j left), for a Linear and 3x3 and 1x1 convs; a grouped conv (whose LoRA peft
    cannot merge) keeps its own weight and runs expert i's branch, the bank's output equal to the
    unmerged one's; every switch writes into the same tensors of the bank's; the backbone's weights are the very tensors after every unmerge, bit for bit,
    and never written in place (their version counters do not move)."""
    bank = _grouped_bank()
    own = {n: (w, w.clone(), w._version) for n, (_, w) in _lora_weights(bank).items()}
    grouped = {n for n, (m, _) in _lora_weights(bank).items() if getattr(m.get_base_layer(), "groups", 1) > 1}
    kinds = {(type(m.get_base_layer()).__name__, getattr(m.get_base_layer(), "kernel_size", None)) for m, _ in _lora_weights(bank).values()}
    assert len(grouped) == 1 and kinds == {("Conv2d", (3, 3)), ("Conv2d", (1, 1)), ("Linear", None)}
    x, reused = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), {}
    for j, i in ((0, 1), (1, 2), (2, 0), (0, 2)):
        bank.merge_expert(j)
        bank.merge_expert(i)
        for n, (layer, merged) in _lora_weights(bank).items():
            w = own[n][0]
            if n in grouped:
                assert merged is w and not layer.merged and layer.active_adapters == [f"expert_{i}"]
                continue
            assert merged is not w and merged.data_ptr() != w.data_ptr() and layer.merged
            assert torch.allclose(merged, w + _delta(layer, f"expert_{i}"), atol=1e-5, rtol=1e-5), n
        ptrs = {n: w.data_ptr() for n, (_, w) in _lora_weights(bank).items() if n not in grouped}
        assert ptrs == reused.setdefault("ptrs", ptrs)  # every switch writes into the bank's same tensors
        with torch.no_grad():  # (a live graph on the merged weights would keep them: the next merge then writes new ones)
            out = bank.run_expert(i, x)
            bank.unmerge()
            assert torch.allclose(out, bank.run_expert(i, x, whole_batch=False), atol=1e-4, rtol=1e-4)
        for n, (_, w) in _lora_weights(bank).items():
            assert w is own[n][0] and torch.equal(w, own[n][1]) and w._version == own[n][2]


def test_a_deep_copy_of_a_merged_bank_is_independent():
    """A deep copy taken while expert 1 is merged switches, unmerges and trains on its own: the
    original keeps expert 1 merged with its values, and each answers as it did before the copy."""
    import copy

    bank = _grouped_bank()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    want = {t: bank(x, torch.tensor(t)) for t in (5, 95, 50)}  # expert 1 left merged
    merged = {n: w.clone() for n, (_, w) in _lora_weights(bank).items()}
    twin = copy.deepcopy(bank)
    assert all(tw.data_ptr() != w.data_ptr() for (_, tw), (_, w) in zip(_lora_weights(twin).values(), _lora_weights(bank).values()))
    assert torch.equal(twin(x, torch.tensor(95)), want[95])  # twin switches to expert 2
    twin.train()  # and unmerges
    with torch.no_grad():
        for p in twin.trainable_parameters(1):
            p.add_(1.0)
    assert bank._merged == 1 and all(torch.equal(w, merged[n]) for n, (_, w) in _lora_weights(bank).items())
    for t in (50, 5, 95, 50):
        assert torch.equal(bank(x, torch.tensor(t)), want[t])


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_merged_guidance_gradients_equal_the_lora_branches_on_transformers_guides(family):
    """The input gradient the guidance takes, through a merged expert of a transformers guide,
    equals that through peft's separate LoRA branches, at every expert."""
    from ppap import GuideModel, NoisyInputGuidance

    from tiny_hf import tiny_resnet, tiny_vit

    guide = GuideModel.from_transformers({"vit": tiny_vit, "resnet": tiny_resnet}[family](), task="classification", ref=family)
    guide.input_size = guide.input_size or (32, 32)
    bank = LoRAExperts(guide, TimestepRouter.uniform(3, 100), AdapterConfig(rank=2, alpha=4))
    with torch.no_grad():
        for name, p in bank.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    bank.eval()
    x, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    grads = {}
    for merge in (True, False):
        bank.merge = merge
        guidance = NoisyInputGuidance(bank, Classification(10), y, 1.0)
        grads[merge] = [guidance(x, torch.full((2,), t), None) for t in (10, 50, 90, 50)]
        assert bank._merged == (1 if merge else None)
    for a, b in zip(grads[True], grads[False]):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
