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
