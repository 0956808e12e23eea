"""File helpers: permissions of what ppap writes, weight fingerprints, the run-identity check."""

import os

import pytest
import torch

from ppap import io


def test_saves_read_the_umask_without_setting_it(tmp_path, monkeypatch):
    """os.umask can only be read by replacing it, which races with other threads creating files:
    a save must never call it, and must still follow the umask in force at the time of the save."""
    old = os.umask(0o027)  # not the usual 022, so that a value read at import would be wrong
    try:
        calls = []
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
        io.atomic_write_json(tmp_path / "a.json", {"a": 1})
        io.atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert calls == []
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.json": 0o640, "w.safetensors": 0o640}


def test_fingerprints_of_copies_in_other_precisions_agree_at_that_precision():
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "b": torch.randn(4), "steps": torch.tensor(7)}
    assert io.fingerprint(state, torch.float32) == io.fingerprint(state)  # float32 weights: the plain fingerprint
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    assert io.fingerprint(half) != io.fingerprint(state)
    assert io.fingerprint(half, torch.bfloat16) == io.fingerprint(state, torch.bfloat16)
    moved = dict(state, w=state["w"] + 1e-3)
    assert io.fingerprint(moved, torch.bfloat16) != io.fingerprint(state, torch.bfloat16)


def test_a_run_goes_on_only_with_the_settings_it_stored():
    """Stored settings come back from JSON (lists, 8.0 for 8); current ones are Python values
    (tuples, ints): equal settings pass, and a refusal is one line naming every differing field,
    with both values where one field differs and they are short."""
    stored = {"widths": [32, 64], "lr": 8.0, "seed": 0, "workers": 1, "log": "a"}
    current = {"widths": (32, 64), "lr": 8, "seed": 0, "workers": 4}
    io.check_same_settings(stored, current, "run", "fix", ignore=["workers", "log"])
    io.check_same_settings(stored, current | {"seed": 1}, "run", "fix", keys=["widths", "lr"])  # only these count
    with pytest.raises(io.PPAPError) as e:
        io.check_same_settings(stored, current | {"seed": 1}, "out/ holds another run", "use another --out", ignore=["workers", "log"])
    assert str(e.value) == "out/ holds another run (seed: 0 there, 1 here); use another --out"
    with pytest.raises(io.PPAPError, match=r"^run \(widths, seed differ\); fix$"):
        io.check_same_settings(stored, current | {"widths": (32,), "seed": 1}, "run", "fix", ignore=["workers", "log"])
    with pytest.raises(io.PPAPError, match=r"^run \(labels differs\); fix$"):  # values too long to show
        io.check_same_settings({"labels": list(range(50))}, {"labels": list(range(51))}, "run", "fix")
    with pytest.raises(io.PPAPError, match=r"\(log: 'a' there, None here\)"):  # a field one side lacks
        io.check_same_settings(stored, current, "run", "fix", ignore=["workers"])
