"""File helpers: permissions of what ppap writes, weight fingerprints."""

import os

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
