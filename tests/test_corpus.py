"""The data-free corpus keeps its own integrity: checksummed shards, a validated manifest, a lock."""

import hashlib
import json
import multiprocessing

import numpy as np
import pytest
import torch

from ppap import PPAPError
from ppap.corpus import CorpusSpec, load_corpus, open_corpus, shard_path, write_shard
from ppap.io import Field, check_fields, read_json_object


def _spec(**kw) -> CorpusSpec:
    return CorpusSpec(
        **(
            {
                "model": "m@0",
                "num_samples": 10,
                "shard_size": 4,
                "steps": 2,
                "eta": 0.0,
                "seed": 0,
                "schedule": {"num_train_timesteps": 100},
            }
            | kw
        )
    )


def _images(k: int, n: int, hw: int = 8) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, (n, hw, hw, 1), dtype=np.uint8)  # stands in for a generator


def _fill(root, spec=None) -> CorpusSpec:
    """Open ``root`` and draw what it lacks, as ``generate_corpus`` does."""
    spec = spec or _spec()
    for k in open_corpus(root, spec):
        write_shard(root, k, _images(k, spec.shard_count(k)))
    return spec


def _expected(spec) -> torch.Tensor:
    x = np.concatenate([_images(k, spec.shard_count(k)) for k in range(spec.num_shards)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def _manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _plant(root, k, arr):
    """Put ``arr`` in shard k *with* a matching record: a shard only its shape can give away."""
    np.save(shard_path(root, k), arr)
    data = shard_path(root, k).read_bytes()
    meta = _manifest(root)
    meta["shards"][f"{k:05d}"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "shape": [max(0, d) for d in (list(arr.shape) + [1] * 4)[:4]],
        "dtype": "uint8",
    }
    (root / "manifest.json").write_text(json.dumps(meta))


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for part in parts:
        assert part in msg, msg


def _tidy(root):
    """Nothing half-written: no temp files, and the manifest is whole."""
    assert not list(root.glob(".*.tmp"))
    assert _manifest(root)["format"] == "ppap-corpus-v2"


def test_a_corpus_records_its_shards_and_loads(tmp_path):
    spec = _fill(tmp_path)
    meta = _manifest(tmp_path)
    assert sorted(meta["shards"]) == ["00000", "00001", "00002"]
    rec = meta["shards"]["00002"]
    assert rec["shape"] == [2, 8, 8, 1] and rec["dtype"] == "uint8"
    assert rec["sha256"] == hashlib.sha256(shard_path(tmp_path, 2).read_bytes()).hexdigest()
    assert torch.equal(load_corpus(tmp_path), _expected(spec))
    assert torch.equal(load_corpus(tmp_path, limit=5), _expected(spec)[:5])
    assert open_corpus(tmp_path, spec) == [] and (tmp_path / ".lock").exists()
    _tidy(tmp_path)
    with pytest.raises(PPAPError) as e:
        open_corpus(tmp_path, _spec(seed=1))
    _one_line(e, "holds a different corpus (seed: 0 there, 1 here); use another --out or the same settings to resume")


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_shard_is_refused_then_redrawn(tmp_path, damage):
    spec = _fill(tmp_path)
    path = shard_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(PPAPError) as e:
        load_corpus(tmp_path)
    _one_line(e, f"corpus shard {path} is damaged (checksum mismatch); re-run `ppap generate`", "to re-draw it")
    assert open_corpus(tmp_path, spec) == [1] and not path.exists()  # re-opening drops it ...
    assert "00001" not in _manifest(tmp_path)["shards"]
    _fill(tmp_path)  # ... and generating again re-draws exactly it
    assert torch.equal(load_corpus(tmp_path), _expected(spec))
    _tidy(tmp_path)


def test_foreign_or_unrecorded_shards_are_never_adopted(tmp_path):
    spec = _fill(tmp_path / "a")
    other = tmp_path / "b"  # another run's shards dropped into a folder without a manifest
    other.mkdir()
    for k in range(3):
        shard_path(other, k).write_bytes(shard_path(tmp_path / "a", k).read_bytes())
    (other / "shard-00042.npy").write_bytes(b"junk")
    assert open_corpus(other, spec) == [0, 1, 2]
    assert not list(other.glob("shard-*.npy")) and _manifest(other)["shards"] == {}

    # a crash between a shard's file and its record: the file exists, the manifest does not know it
    a = tmp_path / "a"
    meta = _manifest(a)
    del meta["shards"]["00002"]
    (a / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(PPAPError) as e:
        load_corpus(a)
    _one_line(e, f"corpus shard {shard_path(a, 2)} is not recorded in the manifest")
    assert open_corpus(a, spec) == [2] and not shard_path(a, 2).exists()
    _fill(a)
    assert torch.equal(load_corpus(a), _expected(spec))
    _tidy(a)


def test_a_missing_shard_is_named(tmp_path):
    _fill(tmp_path)
    shard_path(tmp_path, 2).unlink()
    with pytest.raises(PPAPError) as e:
        load_corpus(tmp_path)
    _one_line(e, f"corpus {tmp_path} is incomplete: shard shard-00002.npy of 3 is missing", "to finish it")


BAD_SHARDS = {
    "float32": (np.zeros((4, 8, 8, 1), np.float32), "is not uint8 [n, H, W, C] images (it is float32 [4, 8, 8, 1])"),
    "no images": (np.zeros((0, 8, 8, 1), np.uint8), "is a shard of 0 images where the corpus needs 4"),
    "other size": (np.zeros((4, 16, 8, 1), np.uint8), "is a shard of [16, 8, 1] images (H, W, C) where the others have [8, 8, 1]"),
    "rank 3": (np.zeros((4, 8, 8), np.uint8), "is not uint8 [n, H, W, C] images (it is uint8 [4, 8, 8])"),
}


@pytest.mark.parametrize("case", list(BAD_SHARDS))
def test_malformed_shards_are_refused_by_name(tmp_path, case):
    arr, message = BAD_SHARDS[case]
    spec = _fill(tmp_path)
    _plant(tmp_path, 1, arr)
    with pytest.raises(PPAPError) as e:
        load_corpus(tmp_path)
    _one_line(e, f"corpus shard {shard_path(tmp_path, 1)} {message}")
    assert open_corpus(tmp_path, spec) == [1] and not shard_path(tmp_path, 1).exists()  # and generate repairs it
    _fill(tmp_path)
    assert torch.equal(load_corpus(tmp_path), _expected(spec))
    _tidy(tmp_path)


def test_write_shard_refuses_what_would_not_load(tmp_path):
    _fill(tmp_path)
    for k, arr, message in [
        (1, _images(1, 3), "must hold 4 images"),
        (3, _images(3, 4), "must hold"),
        (1, _images(1, 4, hw=16), "unlike the other shards"),
        (1, np.zeros((4, 8, 8, 1), np.float32), "uint8"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_shard(tmp_path, k, arr)
    with pytest.raises(PPAPError, match="is not a ppap corpus"):
        write_shard(tmp_path / "nowhere", 0, _images(0, 4))
    assert torch.equal(load_corpus(tmp_path), _expected(_spec()))
    _tidy(tmp_path)


MANIFESTS = {  # what to write as manifest.json -> what the one-line error must name
    "truncated": (lambda m: json.dumps(m)[:40], "is not valid JSON"),
    "binary": (lambda m: b"\x93NUMPY\x00\xff\xfe garbage", "is not valid JSON (not UTF-8 text)"),
    "a list": (lambda m: json.dumps([m]), "is not a JSON object (it is a list)"),
    "missing key": (lambda m: json.dumps({k: v for k, v in m.items() if k != "seed"}), "lacks field 'seed'"),
    "wrong type": (lambda m: json.dumps(m | {"steps": "2"}), "field 'steps' must be an integer >= 1, got \"2\""),
    "shard_size 0": (lambda m: json.dumps(m | {"shard_size": 0}), "field 'shard_size' must be an integer >= 1, got 0"),
    "negative count": (lambda m: json.dumps(m | {"num_samples": -3}), "field 'num_samples' must be an integer >= 1, got -3"),
    "bool count": (lambda m: json.dumps(m | {"batch_size": True}), "field 'batch_size' must be an integer >= 1, got true"),
    "nan eta": (lambda m: json.dumps(m | {"eta": float("nan")}), "field 'eta' must be a number (finite, >= 0), got nan"),
    "other format": (lambda m: json.dumps(m | {"format": "x"}), "field 'format' must be a string 'ppap-corpus-v2', got \"x\""),
    "no shards": (lambda m: json.dumps({k: v for k, v in m.items() if k != "shards"}), "lacks field 'shards'"),
    "bad record": (
        lambda m: json.dumps(m | {"shards": {"00000": m["shards"]["00000"] | {"sha256": 7}}}),
        "record of shard 00000: field 'sha256' must be a string of 64 hex digits, got 7",
    ),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_damaged_manifest_is_one_line_naming_the_field(tmp_path, case):
    make, message = MANIFESTS[case]
    spec = _fill(tmp_path)
    content = make(_manifest(tmp_path))
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    shards = {p.name: p.read_bytes() for p in tmp_path.glob("shard-*.npy")}
    for action in (lambda: open_corpus(tmp_path, spec), lambda: load_corpus(tmp_path), lambda: write_shard(tmp_path, 0, _images(0, 4))):
        with pytest.raises(PPAPError) as e:
            action()
        _one_line(e, f"corpus manifest {manifest}", message)
    assert manifest.read_bytes() == (content if isinstance(content, bytes) else content.encode())  # untouched
    assert {p.name: p.read_bytes() for p in tmp_path.glob("shard-*.npy")} == shards  # nothing deleted on a bad manifest


def test_orphan_temp_files_are_removed_by_the_opener(tmp_path):
    spec = _fill(tmp_path)
    orphans = [tmp_path / ".shard-00001.npy.k3j2.tmp", tmp_path / ".manifest.json.a9x.tmp"]
    for p in orphans:
        p.write_bytes(b"half a file")  # a writer killed mid-write
    assert open_corpus(tmp_path, spec) == []
    assert not any(p.exists() for p in orphans)
    assert torch.equal(load_corpus(tmp_path), _expected(spec))
    _tidy(tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_samples": 0},
        {"shard_size": 0},
        {"steps": 0},
        {"eta": -0.5},
        {"eta": float("inf")},
        {"batch_size": 0},
        {"num_samples": 2.5},
        {"seed": "0"},
    ],
)
def test_an_invalid_spec_leaves_no_trace(tmp_path, bad):
    root = tmp_path / "new" / "corpus"
    with pytest.raises(PPAPError) as e:
        open_corpus(root, _spec(**bad))
    key = next(iter(bad))
    _one_line(e, f"corpus spec: field '{key}' must be")
    assert not (tmp_path / "new").exists()
    assert open_corpus(root, _spec()) == [0, 1, 2]  # the corrected call then runs


def test_a_v1_corpus_is_upgraded_in_place(tmp_path):
    spec = _spec()
    (tmp_path / "manifest.json").write_text(json.dumps(spec.__dict__ | {"format": "ppap-corpus-v1"}))
    for k in range(3):
        np.save(shard_path(tmp_path, k), _images(k, spec.shard_count(k)))
    with pytest.raises(PPAPError) as e:
        load_corpus(tmp_path)
    _one_line(e, "has no shard checksums (ppap-corpus-v1); re-run `ppap generate` with the same settings once")
    assert open_corpus(tmp_path, spec) == []
    assert torch.equal(load_corpus(tmp_path), _expected(spec))
    _tidy(tmp_path)


def _race(rank, roots, barrier, results):
    for root in roots:
        barrier.wait(timeout=120)  # both processes open the same fresh folder at the same moment
        try:
            open_corpus(root, _spec(seed=rank))
            results.put((root, rank, "ok"))
        except PPAPError as e:
            results.put((root, rank, str(e)))


def test_two_openers_with_different_specs_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    roots = [str(tmp_path / f"trial{i}") for i in range(20)]
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(rank, roots, barrier, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=180) for _ in range(2 * len(roots))]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for root in roots:
        outcome = {rank: r for rt, rank, r in got if rt == root}
        winners = [rank for rank, r in outcome.items() if r == "ok"]
        assert len(winners) == 1, (root, outcome)
        loser = outcome[1 - winners[0]]
        assert "holds a different corpus (seed: " in loser and "\n" not in loser
        assert json.loads((tmp_path / root / "manifest.json").read_text())["seed"] == winners[0]


def test_generate_corpus_redraws_a_truncated_shard(tmp_path):
    from diffusers import DDPMScheduler

    from ppap import PPAPPipeline
    from ppap.batch_sampling import generate_corpus
    from ppap.corpus import corpus_spec

    from conftest import tiny_unet

    pipe = PPAPPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    spec = corpus_spec(pipe, "tiny", 10, shard_size=4, steps=2, batch_size=4)
    open_corpus(tmp_path, spec)
    assert generate_corpus(pipe, tmp_path, spec, progress=False) == 3
    before = load_corpus(tmp_path)
    path = shard_path(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:100])  # as a full disk or a copy cut short leaves it
    assert generate_corpus(pipe, tmp_path, spec, progress=False) == 1  # a drawing rank sees the shard as missing
    assert torch.equal(load_corpus(tmp_path), before)
    path.write_bytes(path.read_bytes()[:100])
    assert open_corpus(tmp_path, spec) == [1] and not path.exists()  # the opener drops it,
    assert generate_corpus(pipe, tmp_path, spec, progress=False) == 1  # generate re-draws the same images
    assert torch.equal(load_corpus(tmp_path), before) and before.shape == (10, 1, 8, 8)
    _tidy(tmp_path)
    with pytest.raises(PPAPError, match=r"corpus spec: field .eta. must be a number \(finite, >= 0\), got nan"):
        corpus_spec(pipe, "tiny", 10, eta=float("nan"))


def test_read_json_object_checks_types_and_values(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"rank": 4, "scale": 1, "name": "x", "flag": True}))
    schema = {
        "rank": Field(int, lambda v: v >= 1, ">= 1"),
        "scale": (float,),
        "name": (str, None, "", True),
        "extra": Field((list, type(None)), required=False),
    }
    assert read_json_object(path, "config", schema)["scale"] == 1  # a float field takes JSON integers
    with pytest.raises(PPAPError, match=r"config .*cfg.json: field 'flag' must be an integer, got true"):
        read_json_object(path, "config", {"flag": (int,)})  # true is not an integer
    with pytest.raises(PPAPError, match="field 'extra' must be a list or null, got 3"):
        check_fields(
            {"extra": 3}, "x", schema | {"rank": (int, None, "", False), "scale": (float, None, "", False), "name": (str, None, "", False)}
        )
    with pytest.raises(PPAPError, match=f"config not found: {tmp_path / 'none.json'}"):
        read_json_object(tmp_path / "none.json", "config", schema)
    with pytest.raises(PPAPError, match="cannot read config"):
        read_json_object(tmp_path, "config", schema)  # a folder


def test_a_larger_corpus_reuses_the_shards_it_shares(tmp_path):
    """Sample k depends only on the seed and k, so a larger corpus with the same settings copies
    the smaller one's whole shards (checked against its manifest) and draws only the rest."""
    from ppap.corpus import reuse_shards

    assert _fill(tmp_path / "small").num_shards == 3  # shards of 4, 4, 2
    (tmp_path / "small" / "shard-00001.npy").write_bytes(b"damaged")  # a shard that fails its checksum is not copied
    big = _spec(num_samples=20)
    open_corpus(tmp_path / "big", big)
    assert reuse_shards(tmp_path / "big", big, tmp_path / "small") == 1  # shard 0; 1 is damaged, 2 is partial in the small one
    assert open_corpus(tmp_path / "big", big) == [1, 2, 3, 4]
    assert np.array_equal(np.load(shard_path(tmp_path / "big", 0)), _images(0, 4))
    assert reuse_shards(tmp_path / "big", big, tmp_path / "big") == 0  # nothing left that it could copy
    other = _spec(num_samples=20, seed=1)
    open_corpus(tmp_path / "other", other)
    with pytest.raises(PPAPError) as e:  # another seed: other samples
        reuse_shards(tmp_path / "other", other, tmp_path / "small")
    _one_line(e, "was drawn with other settings (seed: 0 there, 1 here); nothing reused")
    assert open_corpus(tmp_path / "other", other) == [0, 1, 2, 3, 4]
    labelled = _spec(num_samples=20, condition={"class_labels": list(range(20)) * 5})  # a conditional corpus: long settings
    open_corpus(tmp_path / "labelled", labelled)
    with pytest.raises(PPAPError) as e:
        reuse_shards(tmp_path / "labelled", labelled, tmp_path / "small")
    _one_line(e, "was drawn with other settings (condition differs); nothing reused")
    _tidy(tmp_path / "big")
