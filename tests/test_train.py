import dataclasses

import pytest
import torch

from ppap import AdapterConfig, Classification, LoRAExperts, PPAPError, TimestepRouter, TrainConfig, load_bank, train_experts
from ppap.models import tiny_classifier

CFG = TrainConfig(experts="2", rank=4, alpha=4, iterations=30, batch_size=8, lr=5e-3, checkpoint_every=10)


def _bank():
    torch.manual_seed(0)
    return LoRAExperts(tiny_classifier(), TimestepRouter.uniform(2, 100), AdapterConfig(rank=4, alpha=4))


def _images():
    return torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_resume_after_crash_loses_and_duplicates_nothing(tiny_diffusion, tmp_path, monkeypatch):
    """Crash in the middle of expert 1, re-run: the result is bit-identical to a run that never
    stopped (every batch seen exactly once, optimiser state restored)."""
    task = Classification(10)
    reference = _bank()
    train_experts(reference, task, tiny_diffusion.schedule, _images(), CFG, tmp_path / "ref", progress=False)

    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 30 + 25:  # expert 1, step 25: after its checkpoint at step 20
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_experts(_bank(), task, tiny_diffusion.schedule, _images(), CFG, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / ".resume" / "expert_1.pt").exists()
    assert (tmp_path / "run" / "expert_0").exists() and not (tmp_path / "run" / "expert_1").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = _bank()
    stats = train_experts(resumed, task, tiny_diffusion.schedule, _images(), CFG, tmp_path / "run", progress=False)
    assert list(stats) == ["expert_1"]  # expert 0 was finished and is not trained again
    for i in range(2):
        ref, got = reference.expert_state(i), resumed.expert_state(i)
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"expert {i} differs after resume"
    assert not (tmp_path / "run" / ".resume" / "expert_1.pt").exists()


def test_warm_start_starts_from_the_previous_expert(tiny_diffusion, tmp_path, monkeypatch):
    cfg = TrainConfig(experts="2", rank=4, alpha=4, iterations=5, batch_size=8, warm_start=True)
    bank = _bank()
    seen = {}
    real = LoRAExperts.trainable_parameters

    def spy(self, i):
        if i == 1 and "start" not in seen:
            seen["start"] = self.expert_state(1)
            seen["prev"] = self.expert_state(0)
        return real(self, i)

    monkeypatch.setattr(LoRAExperts, "trainable_parameters", spy)
    train_experts(bank, Classification(10), tiny_diffusion.schedule, _images(), cfg, tmp_path, progress=False)
    assert all(torch.equal(seen["start"][k], seen["prev"][k]) for k in seen["prev"])


def test_supervised_objective_needs_labels(tiny_diffusion, tmp_path):
    cfg = TrainConfig(objective="supervised", experts="2", iterations=3, batch_size=8)
    with pytest.raises(PPAPError, match="needs labelled images"):
        train_experts(_bank(), Classification(10), tiny_diffusion.schedule, _images(), cfg, tmp_path, progress=False)
    labels = torch.randint(0, 10, (48,))
    stats = train_experts(_bank(), Classification(10), tiny_diffusion.schedule, _images(), cfg, tmp_path, labels=labels, progress=False)
    assert set(stats) == {"expert_0", "expert_1"}


def test_other_settings_in_the_same_directory_are_refused(tiny_diffusion, tmp_path):
    train_experts(
        _bank(),
        Classification(10),
        tiny_diffusion.schedule,
        _images(),
        TrainConfig(experts="2", rank=4, alpha=4, iterations=2, batch_size=8),
        tmp_path,
        progress=False,
    )
    with pytest.raises(PPAPError, match="trained with other settings \\(train differs\\)"):
        train_experts(
            _bank(),
            Classification(10),
            tiny_diffusion.schedule,
            _images(),
            TrainConfig(experts="2", rank=4, alpha=4, iterations=3, batch_size=8),
            tmp_path,
            progress=False,
        )


def test_same_settings_written_as_int_or_float_resume(tiny_diffusion, tmp_path):
    """alpha=4 from a flag and alpha=4.0 from a JSON config are the same setting: a finished
    folder is reused, not refused."""
    cfg = TrainConfig(experts="2", rank=4, alpha=4, iterations=2, batch_size=8)
    train_experts(_bank(), Classification(10), tiny_diffusion.schedule, _images(), cfg, tmp_path, progress=False)
    again = train_experts(
        _bank(), Classification(10), tiny_diffusion.schedule, _images(), dataclasses.replace(cfg, alpha=4.0), tmp_path, progress=False
    )
    assert again == {}  # nothing left to train


def test_load_experts_checks_model_and_schedule(tiny_diffusion, tmp_path):
    from diffusers import DDPMScheduler

    from ppap import NoiseSchedule

    train_experts(
        _bank(),
        Classification(10),
        tiny_diffusion.schedule,
        _images(),
        TrainConfig(experts="2", rank=4, alpha=4, iterations=2, batch_size=8),
        tmp_path,
        progress=False,
    )
    torch.manual_seed(0)
    bank = load_bank(tiny_classifier(), tmp_path, schedule=tiny_diffusion.schedule)
    assert bank.task == Classification(10) and bank.router.boundaries == (0, 50, 100)
    torch.manual_seed(1)
    with pytest.raises(PPAPError, match="were trained on .* not on the given guidance model"):
        load_bank(tiny_classifier(), tmp_path)
    other = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"))
    torch.manual_seed(0)
    with pytest.raises(PPAPError, match="another noise schedule"):
        load_bank(tiny_classifier(), tmp_path, schedule=other)


def test_save_bank_round_trips_through_load_bank(tiny_diffusion, tmp_path):
    """A bank trained by the user's own loop, saved with save_bank, loads with the same experts."""
    from ppap import save_bank

    bank = _bank()
    with torch.no_grad():
        for name, p in bank.model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    save_bank(bank, tmp_path, Classification(10), tiny_diffusion.schedule)
    torch.manual_seed(0)
    loaded = load_bank(tiny_classifier(), tmp_path, schedule=tiny_diffusion.schedule)
    x = _images()[:4]
    for i in range(2):
        assert torch.allclose(loaded.run_expert(i, x), bank.eval().run_expert(i, x), atol=1e-6)
    assert loaded.task == Classification(10)


def test_batches_are_a_pure_function_of_the_step():
    from ppap.train import InfiniteBatches

    data = torch.arange(10)
    a = InfiniteBatches(data, batch_size=4, seed=3)
    b = InfiniteBatches(data, batch_size=4, seed=3)
    seq = [a.batch(s)[0] for s in range(5)]  # 20 samples = two full epochs
    assert torch.equal(torch.sort(torch.cat(seq[:2] + [seq[2][:2]])).values, data)  # epoch 0: each sample once
    assert torch.equal(b.batch(3)[0], seq[3])  # no history needed (resume)


def test_class_balanced_batches_even_out_the_teachers_pseudo_labels(tiny_diffusion, tmp_path):
    """balance_classes: a corpus whose pseudo-labels are 90% class 0 is drawn 50/50, the draw is a
    pure function of (seed, step) like the plain one, and training with it runs and differs."""
    from ppap.train import InfiniteBatches, class_balance_weights

    logits = torch.zeros(100, 10)
    logits[:90, 0], logits[90:, 1] = 5.0, 5.0
    weights = class_balance_weights(logits)
    a, b = (InfiniteBatches(torch.arange(100), batch_size=50, seed=3, weights=weights) for _ in range(2))
    drawn = torch.cat([a.batch(s)[0] for s in range(40)])
    assert abs((drawn >= 90).float().mean().item() - 0.5) < 0.05
    assert all(torch.equal(a.batch(s)[0], b.batch(s)[0]) for s in (0, 7, 39))
    plain = torch.cat([InfiniteBatches(torch.arange(100), batch_size=50, seed=3).batch(s)[0] for s in range(40)])
    assert abs((plain >= 90).float().mean().item() - 0.1) < 1e-6  # without weights: every image once per epoch
    stats = {}
    for balance in (False, True):
        cfg = TrainConfig(experts="2", rank=4, alpha=4, iterations=5, batch_size=8, balance_classes=balance)
        stats[balance] = train_experts(
            _bank(), Classification(10), tiny_diffusion.schedule, _images(), cfg, tmp_path / str(balance), progress=False
        )
    assert stats[True]["expert_0"]["loss_last"] != stats[False]["expert_0"]["loss_last"]


def test_micro_batches_give_the_whole_batch_step_and_resume_either_way(tiny_diffusion, tmp_path):
    """micro_batch runs the batch's forward and backward a few samples at a time (the memory of
    one micro-batch) and adds the gradients up: with frozen norms the experts are those of the
    whole batch. It is how a step is computed, so a folder resumes under another micro_batch."""
    task = Classification(10)
    cfg = dataclasses.replace(CFG, iterations=6, per_expert_norm=False)

    def frozen_norm_bank():
        torch.manual_seed(0)
        return LoRAExperts(tiny_classifier(), TimestepRouter.uniform(2, 100), AdapterConfig(rank=4, alpha=4, per_expert_norm=False))

    whole, micro = frozen_norm_bank(), frozen_norm_bank()
    train_experts(whole, task, tiny_diffusion.schedule, _images(), cfg, tmp_path / "whole", progress=False)
    train_experts(
        micro, task, tiny_diffusion.schedule, _images(), dataclasses.replace(cfg, micro_batch=3), tmp_path / "micro", progress=False
    )
    for i in range(2):
        a, b = whole.expert_state(i), micro.expert_state(i)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
        assert any(not torch.equal(v, frozen_norm_bank().expert_state(i)[k]) for k, v in a.items() if "lora_B" in k)  # it trained
    more = dataclasses.replace(cfg, iterations=8, micro_batch=2)  # not refused as "other settings"
    with pytest.raises(PPAPError, match="iterations differs|other settings"):
        train_experts(frozen_norm_bank(), task, tiny_diffusion.schedule, _images(), more, tmp_path / "whole", progress=False)
    again = dataclasses.replace(cfg, micro_batch=2)
    assert train_experts(frozen_norm_bank(), task, tiny_diffusion.schedule, _images(), again, tmp_path / "whole", progress=False) == {}
    with pytest.raises(PPAPError, match="micro_batch must be >= 0"):
        TrainConfig(micro_batch=-1)
