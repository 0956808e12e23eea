"""Hub ids wherever a model is named, offline: caches in huggingface_hub's own layout
(``models--org--name/snapshots/<commit>/...``, ``refs/<name>`` holding the commit), built here
from tiny models, two revisions each, read with ``HF_HUB_OFFLINE=1``."""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppap import AdapterConfig, ExpertBank, GuideModel, LoRAExperts, TimestepRouter, save_bank
from ppap.cli import main
from ppap.io import PPAPError
from ppap.loading import load_diffusion, load_experts, load_guide, load_pipeline
from ppap.tasks import task_for

from conftest import REPO, tiny_unet
from tiny_hf import tiny_resnet

MAIN, V2 = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"v2").hexdigest()  # commit hashes, 40 hex digits
X = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def put(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> None:
    """``source``'s files as the snapshot ``commit`` of ``repo_id``, named by ``refs``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # as huggingface_hub writes it: no newline


def save_diffusion(folder: Path, seed: int) -> None:
    from diffusers import DDPMScheduler

    from ppap import Diffusion, NoiseSchedule

    Diffusion(tiny_unet(seed), NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100))).save_pretrained(folder)


def save_classifier(folder: Path, seed: int) -> None:
    from transformers import ViTImageProcessor

    tiny_resnet(seed=seed).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)


def save_text_pipeline(folder: Path, seed: int):
    """A text-conditional PPAPPipeline (UNet2DConditionModel, CLIP text encoder, word tokenizer)."""
    from diffusers import DDIMScheduler

    from ppap import PPAPPipeline
    from ppap.text import build_text_encoder, build_word_tokenizer

    from conftest import tiny_cond_unet

    tokenizer = build_word_tokenizer(["a", "red", "blue", "garment"], max_length=4)
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(len(tokenizer), 4, width=8, layers=1, heads=2).eval()
    pipe = PPAPPipeline(tiny_cond_unet(seed), DDIMScheduler(num_train_timesteps=100), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(folder)
    return pipe


def random_bank(guide: GuideModel, seed: int) -> LoRAExperts:
    """Two LoRA experts with random weights (peft starts B at zero: the experts would equal the teacher)."""
    bank = LoRAExperts(copy.deepcopy(guide), TimestepRouter.uniform(2, 100), AdapterConfig(rank=2, alpha=2))
    torch.manual_seed(seed)
    with torch.no_grad():
        for i in range(2):
            for p in bank.trainable_parameters(i):
                p.add_(torch.randn_like(p) * 0.2)
    return bank.eval()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache of org/ddpm, org/clf, org/experts (main and v2), org/pickled; and the models."""
    root = tmp_path_factory.mktemp("hub")
    cache, src = root / "cache", root / "src"
    for rev, seed in (("main", 0), ("v2", 1)):
        save_diffusion(src / "ddpm" / rev, seed)
        save_classifier(src / "clf" / rev, seed)
    tiny_unet(2).to(torch.float16).save_pretrained(
        src / "ddpm" / "main" / "unet", variant="fp16"
    )  # diffusion_pytorch_model.fp16.safetensors
    tiny_unet(3).save_pretrained(src / "ddpm" / "main" / "ema")  # a UNet folder of its own: subfolder="ema"
    diffusion = load_diffusion(str(src / "ddpm" / "main"))
    banks, guides = {}, {}
    for rev, seed in (("main", 10), ("v2", 11)):
        guides[rev] = load_guide(str(src / "clf" / rev))
        banks[rev] = random_bank(guides[rev], seed)
        task = task_for(guides[rev], diffusion.image_shape, "classification", tau=1.0)
        save_bank(banks[rev], src / "experts" / rev, task, diffusion.schedule)
    for name in ("ddpm", "clf", "experts"):
        put(cache, f"org/{name}", MAIN, src / name / "main", ("main",))
        put(cache, f"org/{name}", V2, src / name / "v2", ("v2",))
    pickled = src / "pickled"
    shutil.copytree(src / "ddpm" / "v2" / "unet", pickled)
    (pickled / "diffusion_pytorch_model.safetensors").rename(pickled / "diffusion_pytorch_model.bin")  # never read: refused by name
    shutil.copy(src / "ddpm" / "v2" / "scheduler" / "scheduler_config.json", pickled)
    put(cache, "org/pickled", MAIN, pickled, ("main",))
    text_pipe = save_text_pipeline(src / "text" / "main", seed=4)
    put(cache, "org/text", MAIN, src / "text" / "main", ("main",))
    return {"cache": cache, "src": src, "banks": banks, "guides": guides, "schedule": diffusion.schedule, "text_pipe": text_pipe}


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HUB_CACHE and HF_HUB_OFFLINE in the environment and in huggingface_hub's constants,
    which it reads once, at import."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_diffusion_hub_id_resolves_each_revision(offline):
    main_unet, v2_unet = tiny_unet(0), tiny_unet(1)
    assert not same_weights(main_unet, v2_unet)
    assert same_weights(load_diffusion("org/ddpm").unet, main_unet)
    for ref, revision in (("org/ddpm", "v2"), ("org/ddpm@v2", None), ("org/ddpm", V2), (f"org/ddpm@{V2}", None), ("org/ddpm@v2", "main")):
        d = load_diffusion(ref, revision=revision)  # the reference's own @revision wins over revision=
        assert same_weights(d.unet, v2_unet), (ref, revision)
        assert d.name == ref and d.schedule.num_train_timesteps == 100
    pipe = load_pipeline("org/ddpm@v2")
    assert same_weights(pipe.unet, v2_unet) and pipe.config._name_or_path == "org/ddpm@v2"


def test_diffusion_variant_torch_dtype_and_subfolder(offline):
    pipe = load_pipeline("org/ddpm", variant="fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert same_weights(pipe.unet, tiny_unet(2).to(torch.float16))  # diffusion_pytorch_model.fp16.safetensors
    assert load_pipeline("org/ddpm", torch_dtype="bfloat16").unet.dtype == torch.bfloat16
    with pytest.raises(PPAPError, match=r"has no diffusion_pytorch_model\.fp16\.safetensors"):
        load_pipeline("org/ddpm@v2", variant="fp16")
    ema = load_diffusion("org/ddpm", subfolder="ema")  # a UNet folder; the scheduler from the repo's scheduler/
    assert same_weights(ema.unet, tiny_unet(3))
    assert torch.equal(ema.schedule.alphas_cumprod, load_diffusion("org/ddpm").schedule.alphas_cumprod)
    local = load_diffusion(str(offline["src"] / "ddpm" / "main"), subfolder="ema")  # the same rule for a folder
    assert same_weights(local.unet, tiny_unet(3))
    with pytest.raises(PPAPError, match="org/ddpm has no subfolder 'nope'"):
        load_diffusion("org/ddpm", subfolder="nope")


def test_guide_from_pretrained_loads_the_model_and_its_processor_per_revision(offline):
    main_net, v2_net = tiny_resnet(seed=0), tiny_resnet(seed=1)
    assert not same_weights(main_net, v2_net)
    guide = GuideModel.from_pretrained("org/clf")
    assert same_weights(guide.net, main_net)
    assert guide.input_size == (16, 16) and guide.task == "classification"  # from preprocessor_config.json
    assert guide.ref == "org/clf"
    for ref, revision in (("org/clf", "v2"), ("org/clf@v2", None), ("org/clf", V2)):
        g = GuideModel.from_pretrained(ref, revision=revision)
        assert same_weights(g.net, v2_net) and g.ref.endswith(("@v2", V2))
    assert same_weights(load_guide("org/clf", revision="v2").net, v2_net)


def test_bank_from_pretrained_per_revision_and_save_pretrained_round_trip(offline, tmp_path):
    t = torch.tensor([10, 80, 30])  # both experts
    banks, guides, schedule = offline["banks"], offline["guides"], offline["schedule"]
    want = {rev: banks[rev](X, t) for rev in banks}
    assert not torch.allclose(want["main"], want["v2"])
    loaded = ExpertBank.from_pretrained(copy.deepcopy(guides["main"]), "org/experts", schedule=schedule)
    assert torch.equal(loaded(X, t), want["main"])
    for ref, revision in (("org/experts", "v2"), ("org/experts@v2", None)):
        assert torch.equal(ExpertBank.from_pretrained(copy.deepcopy(guides["v2"]), ref, revision=revision)(X, t), want["v2"])
    with pytest.raises(PPAPError, match="were trained on"):  # v2's experts belong to v2's guide
        ExpertBank.from_pretrained(copy.deepcopy(guides["main"]), "org/experts@v2")
    # save_pretrained -> from_pretrained: the same experts, task, schedule and default scale
    loaded.default_scale = 12.5
    loaded.save_pretrained(tmp_path / "saved")
    again = ExpertBank.from_pretrained(copy.deepcopy(guides["main"]), tmp_path / "saved", schedule=schedule)
    assert torch.equal(again(X, t), want["main"])
    assert again.default_scale == 12.5 and again.task == loaded.task
    # a bank built in memory needs the schedule; then it round-trips as well
    fresh = random_bank(guides["main"], seed=5)
    fresh.task = loaded.task
    with pytest.raises(PPAPError, match="save_pretrained needs schedule="):
        fresh.save_pretrained(tmp_path / "fresh")
    fresh.save_pretrained(tmp_path / "fresh", schedule=schedule)
    assert torch.equal(ExpertBank.from_pretrained(copy.deepcopy(guides["main"]), tmp_path / "fresh")(X, t), fresh(X, t))
    # load_experts, as the CLI calls it
    diffusion = load_diffusion("org/ddpm")
    assert torch.equal(load_experts("org/experts", copy.deepcopy(guides["main"]), diffusion)(X, t), want["main"])


def _sample(argv, tmp_path, capsys, name):
    out = tmp_path / f"{name}.png"
    code = main(["--threads", "1", "sample", *argv, "--num", "2", "--steps", "2", "--scale", "5", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    return code, err, (np.load(out.with_suffix(".npz"))["images"] if code == 0 else None)


def test_cli_samples_from_hub_ids_in_the_cache(offline, tmp_path, capsys):
    models = ["--diffusion", "org/ddpm", "--guide", "org/clf", "--experts", "org/experts"]
    code, err, main_images = _sample(models, tmp_path, capsys, "main")
    assert code == 0, err
    code, err, v2_images = _sample([*models, "--revision", "v2"], tmp_path, capsys, "v2")  # every id at v2
    assert code == 0, err
    assert not np.array_equal(main_images, v2_images)
    # pinned per model: v2's experts load only on v2's guide, so this runs only if both resolved to v2
    code, err, _ = _sample(["--diffusion", "org/ddpm", "--term", "guide=org/clf@v2,experts=org/experts@v2"], tmp_path, capsys, "term")
    assert code == 0, err
    code, err, _ = _sample(["--diffusion", "org/ddpm", "--guide", "org/clf", "--experts", "org/experts@v2"], tmp_path, capsys, "mixed")
    assert code == 2 and "were trained on" in _one_line_error(err)


@pytest.mark.slow
def test_cli_generate_train_sample_with_hub_ids(offline, tmp_path, capsys):
    base = ["--threads", "1"]
    corpus, experts = tmp_path / "corpus", tmp_path / "experts"
    assert main([*base, "generate", "--diffusion", "org/ddpm@v2", "--out", str(corpus), "--num", "8", "--steps", "2", "--quiet"]) == 0
    train = ["train", "--diffusion", "org/ddpm", "--guide", "org/clf", "--revision", "v2", "--data", str(corpus), "--out", str(experts)]
    assert main([*base, *train, "--experts", "2", "--rank", "2", "--iterations", "1", "--batch-size", "4", "--quiet"]) == 0
    assert json.loads((experts / "ppap_experts.json").read_text())["guide"]["ref"] == "org/clf@v2"  # the revision trained on
    code, err, _ = _sample(["--diffusion", "org/ddpm", "--guide", "org/clf@v2", "--experts", str(experts)], tmp_path, capsys, "trained")
    assert code == 0, err


def _one_line_error(err: str) -> str:
    """The error line, the last of stderr (above it, at most transformers' loading progress bar)."""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("ppap: error: ") and not any(line.startswith(("ppap:", "Traceback")) for line in lines[:-1]), err
    return lines[-1]


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--diffusion", "google/ddpm-cifar10-32", "--method", "unguided"], "google/ddpm-cifar10-32"),
        (["--diffusion", "org/ddpm", "--guide", "microsoft/resnet-50", "--method", "naive"], "microsoft/resnet-50"),
        (["--diffusion", "org/ddpm", "--guide", "org/clf", "--experts", "org/missing"], "org/missing"),
        (["--diffusion", "org/ddpm", "--revision", "v9", "--method", "unguided"], "org/ddpm --revision v9"),
    ],
)
def test_uncached_id_offline_is_one_line_naming_the_id_and_how_to_fetch_it(offline, tmp_path, capsys, argv, names):
    code, err, _ = _sample(argv, tmp_path, capsys, "x")
    line = _one_line_error(err)
    assert code == 2
    assert f"`hf download {names}`" in line and "HF_HUB_OFFLINE" in line and str(offline["cache"]) in line
    assert not (tmp_path / "x.png").exists()


def test_malformed_references_and_pickled_weights_are_one_line_errors(offline, tmp_path, capsys):
    for flag in ("--guide", "--experts"):
        extra = ["--guide", "org/clf"] if flag == "--experts" else []
        code, err, _ = _sample(["--diffusion", "org/ddpm", *extra, flag, "not a/model ref"], tmp_path, capsys, "x")
        line = _one_line_error(err)
        assert code == 2 and "not a/model ref" in line and "org/name[@revision]" in line and "zoo name (fashion-" in line
        if flag == "--guide":
            assert "package.module:function" in line
    with pytest.raises(PPAPError, match=r"holds only pickled weights \(diffusion_pytorch_model\.bin\); ppap loads \.safetensors"):
        load_diffusion("org/pickled")


def test_precedence_local_folder_then_zoo_then_hub(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_diffusion(tmp_path / "org" / "ddpm", seed=5)  # a folder spelled like the hub id
    save_diffusion(tmp_path / "fashion-ddpm", seed=5)  # and one spelled like the zoo name
    assert same_weights(load_diffusion("org/ddpm").unet, tiny_unet(5))
    assert same_weights(load_diffusion("fashion-ddpm").unet, tiny_unet(5))
    assert same_weights(load_diffusion("org/ddpm@v2").unet, tiny_unet(1))  # no such folder: the hub id


def test_environment_alone_points_the_cli_at_the_cache(hub, tmp_path):
    """A fresh process reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment."""
    env = os.environ | {"HF_HUB_CACHE": str(hub["cache"]), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "s.png"
    models = ["--diffusion", "org/ddpm@v2", "--guide", "org/clf@v2", "--experts", "org/experts@v2"]
    cmd = [sys.executable, "-m", "ppap", "--threads", "1", "sample", *models, "--num", "1", "--steps", "1", "--out", str(out), "--quiet"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert out.exists()


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """huggingface_hub online, its network replaced by folders of "remote" repos: the fake
    ``snapshot_download`` copies into the cache what ``allow_patterns`` select (with
    huggingface_hub's own ``filter_repo_objects``), or raises the hub's errors."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, filter_repo_objects

    remotes, cache, calls = {}, tmp_path / "cache", []
    for name in ("ddpm", "clf", "text"):
        shutil.copytree(hub["src"] / name / "main", remotes.setdefault(f"org/{name}", tmp_path / "remote" / name))
    for pickle in ("ddpm/unet/diffusion_pytorch_model.bin", "ddpm/vae/diffusion_pytorch_model.safetensors", "clf/pytorch_model.bin"):
        (tmp_path / "remote" / pickle).parent.mkdir(exist_ok=True)
        (tmp_path / "remote" / pickle).write_bytes(b"never to be fetched")
    remotes["org/binonly"] = tmp_path / "remote" / "binonly"
    shutil.copytree(hub["src"] / "pickled", remotes["org/binonly"])
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models"))

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        assert not local_files_only
        calls.append((repo_id, revision, list(allow_patterns)))
        if repo_id == "org/unreachable":  # what snapshot_download raises when the Hub cannot be reached and nothing is cached
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")
        if repo_id not in remotes:
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)
        if revision not in (None, "main", MAIN):
            raise RevisionNotFoundError("404 Client Error. Revision Not Found", response=response)
        remote, snapshot = remotes[repo_id], cache / repo_id / MAIN
        files = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / rel, snapshot / rel)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return {"cache": cache, "calls": calls}


def fetched(cache: Path, repo_id: str) -> set[str]:
    snapshot = cache / repo_id / MAIN
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


def test_online_fetches_json_and_the_safetensors_needed_only(online):
    assert same_weights(load_pipeline("org/ddpm").unet, tiny_unet(0))
    files = fetched(online["cache"], "org/ddpm")
    assert "unet/diffusion_pytorch_model.safetensors" in files and "scheduler/scheduler_config.json" in files
    assert not [f for f in files if f.endswith(".safetensors") and f != "unet/diffusion_pytorch_model.safetensors"]  # no vae, fp16, ema
    assert not [f for f in files if f.endswith(".bin")]
    (_, first, _), (_, second, _) = online["calls"]
    assert first is None and second == MAIN  # the weights come from the commit the configs came from
    assert same_weights(load_guide("org/clf").net, tiny_resnet(seed=0))
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} == fetched(online["cache"], "org/clf")
    with pytest.raises(PPAPError, match=r"has no diffusion_pytorch_model\.safetensors \(ppap loads \.safetensors weights only"):
        load_diffusion("org/binonly")
    assert not [f for f in fetched(online["cache"], "org/binonly") if f.endswith(".bin")]


def test_online_errors_are_one_line(online):
    with pytest.raises(PPAPError, match="the Hugging Face Hub has no model org/nope"):
        load_diffusion("org/nope")
    with pytest.raises(PPAPError, match="hub model org/ddpm has no revision 'v9'"):
        load_guide("org/ddpm@v9")
    with pytest.raises(PPAPError, match="cannot reach the Hugging Face Hub for org/unreachable, and it is not in the cache"):
        load_experts("org/unreachable", GuideModel(torch.nn.Identity()), load_diffusion("org/ddpm"))


def _same_text_pipeline(pipe, saved) -> None:
    from transformers import CLIPTextModel

    assert isinstance(pipe.text_encoder, CLIPTextModel) and same_weights(pipe.text_encoder, saved.text_encoder)
    assert same_weights(pipe.unet, saved.unet) and pipe.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
    assert torch.equal(pipe.encode_prompt("a red garment")[0], saved.encode_prompt("a red garment")[0])


def test_a_text_pipelines_hub_id_brings_its_text_encoder_and_tokenizer(offline):
    _same_text_pipeline(load_pipeline("org/text"), offline["text_pipe"])


def test_online_a_text_pipeline_fetches_its_text_encoder_and_tokenizer_but_no_code(online, hub):
    _same_text_pipeline(load_pipeline("org/text"), hub["text_pipe"])
    files = fetched(online["cache"], "org/text")
    assert {"text_encoder/model.safetensors", "tokenizer/tokenizer.json", "unet/diffusion_pytorch_model.safetensors"} <= files
    assert (hub["src"] / "text" / "main" / "ppap_pipeline.py").exists() and not [f for f in files if f.endswith(".py")]
