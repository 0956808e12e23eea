"""The on-disk format of an expert bank: one folder per expert and a manifest beside them.

``directory/expert_i/`` holds expert i in peft's own layout (``adapter_config.json`` and
``adapter_model.safetensors``; a full copy: ``model.safetensors``), and ``ppap_experts.json``
(``BANK_MANIFEST``) the router, the adapter settings, the task, and fingerprints of the guide and
noise schedule the experts belong to, with each file's sha256. This module writes and checks
those files; building a bank from them is ``ppap.banks.load_bank``. It works on any bank through
its methods (``save_expert``, ``expert_state``, ...) and imports no bank class.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .diffusion import NoiseSchedule
from .io import (
    PPAPError,
    atomic_save_safetensors,
    atomic_write_json,
    check_fields,
    file_sha256,
    fingerprint,
    give_usual_permissions,
    load_safetensors,
    load_weights_into,
    read_json,
)
from .router import TimestepRouter
from .tasks import Task, make_task

if TYPE_CHECKING:
    from .banks import ExpertBank

BANK_MANIFEST = "ppap_experts.json"
BANK_FORMAT = "ppap-experts-v2"  # v2: adapters on the bare off-the-shelf model (v1 had a private "net." prefix)
OLD_BANK_FORMATS = ("ppap-experts-v1",)
BANK_FILES = ("*.json", "*.safetensors")  # the manifest and each expert's adapter config and weights


def expert_name(i: int) -> str:
    """Expert i's adapter name and folder: ``expert_i``."""
    return f"expert_{i}"


def parameter_report(bank: ExpertBank) -> dict[str, float]:
    """Trainable parameters of one expert, as a count and as a fraction of the backbone."""
    backbone = sum(v.numel() for k, v in bank.base_state().items() if v.is_floating_point() and "running_" not in k)
    per_expert = sum(p.numel() for p in bank.trainable_parameters(0))
    return {
        "backbone_parameters": backbone,
        "trainable_per_expert": per_expert,
        "fraction_per_expert": per_expert / backbone,
        "num_experts": bank.router.num_experts,
    }


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_fingerprints(state: dict[str, Tensor]) -> dict[str, str]:
    """A backbone's fingerprint at each precision a guide may run in: its weights' values in
    float32, and rounded to bfloat16 and to float16."""
    return {name: fingerprint(state, dtype) for name, dtype in PRECISIONS.items()}


def _precision(state: dict[str, Tensor]) -> str:
    """The precision a net computes in: "bfloat16" / "float16" when its weights are, else "float32"."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return next((name for name in ("bfloat16", "float16") if PRECISIONS[name] in dtypes), "float32")


def check_guide(state: dict[str, Tensor], manifest: dict, directory: Path) -> None:
    """Refuse a guide whose weights ``state`` are not those the experts in ``manifest`` were
    trained on, compared at the guide's precision: a half-precision guide against the trained
    guide's weights rounded alike (a bank trained in float32 loads on a bfloat16 or float16
    copy of its guide), a float32 guide at any precision the manifest records (a bank trained on
    a bfloat16 copy loads on the float32 original)."""
    recorded = {"float32": manifest["guide_fingerprint"]} | (manifest.get("guide_fingerprints") or {})
    own = _precision(state)
    # dtype None: the plain fingerprint (that of float32 weights; what manifests of float64 guides hold)
    tries = [(None, "float32"), (torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")]
    for dtype, precision in tries if own == "float32" else [(PRECISIONS[own], own)]:
        if precision in recorded and fingerprint(state, dtype) == recorded[precision]:
            return
    name = (manifest.get("guide") or {}).get("ref", "another model")
    if own not in recorded:
        raise PPAPError(
            f"experts in {directory} record no {own} fingerprint of their guide ({name}): load the guide in float32, "
            f"then cast it with the bank (bank.to(torch.{own}))"
        )
    raise PPAPError(
        f"experts in {directory} were trained on {name} (weights {str(recorded[own])[:12]}), "
        f"not on the given guidance model (weights {fingerprint(state, PRECISIONS[own])[:12]})"
    )


def schedule_fingerprint(schedule: NoiseSchedule) -> str:
    return fingerprint({"alphas_cumprod": schedule.alphas_cumprod})


def bank_manifest(bank: ExpertBank, task: Task, schedule: NoiseSchedule, **extra) -> dict:
    """The description of a bank that ``load_bank`` needs: router, adapter, task, the backbone
    and schedule it belongs to; ``trained`` (finished experts) and ``files`` (their sha256) are
    filled in as experts are saved."""
    return {
        "format": BANK_FORMAT,
        "boundaries": list(bank.router.boundaries),
        "adapter": asdict(bank.adapter),
        "task": asdict(task),  # type: ignore[call-overload]  # every Task is a dataclass
        "guide": bank.guide.identity,
        "guide_fingerprint": bank.base_fingerprint,
        "guide_fingerprints": {k: v for k, v in bank.base_fingerprints.items() if k != "float32"},
        "schedule": {"num_train_timesteps": schedule.num_train_timesteps, "fingerprint": schedule_fingerprint(schedule)},
        "trained": [],
        "files": {},
        "stats": {},
        "parameters": parameter_report(bank),
    } | extra


def record_expert(manifest: dict, bank: ExpertBank, i: int, directory: str | os.PathLike, stats: dict | None = None) -> dict:
    """Save expert i and note it (and its files' checksums) in ``manifest``; returns the manifest."""
    root = Path(directory)
    for path in bank.save_expert(i, root):
        manifest.setdefault("files", {})[path.relative_to(root).as_posix()] = file_sha256(path)
    manifest["trained"] = sorted(set(manifest["trained"]) | {expert_name(i)}, key=lambda n: int(n.split("_")[1]))
    if stats is not None:
        manifest["stats"][expert_name(i)] = stats
    return manifest


def save_bank(bank: ExpertBank, directory: str | os.PathLike, task: Task, schedule: NoiseSchedule, **extra) -> None:
    """Write every expert of ``bank`` and its manifest to ``directory`` (``load_bank`` reads it)."""
    manifest = bank_manifest(bank, task, schedule, **extra)
    for i in range(bank.router.num_experts):
        record_expert(manifest, bank, i, directory)
    atomic_write_json(Path(directory) / BANK_MANIFEST, manifest)


def load_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise PPAPError(f"experts directory not found: {directory}")
    manifest = read_json(directory / BANK_MANIFEST, "expert manifest")
    if not isinstance(manifest, dict) or manifest.get("format") not in (BANK_FORMAT,) + OLD_BANK_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PPAPError(f"{directory / BANK_MANIFEST} is not a ppap expert manifest (format {found!r}, expected {BANK_FORMAT!r})")
    return check_fields(manifest, f"expert manifest {directory / BANK_MANIFEST}", MANIFEST_SCHEMA)


MANIFEST_SCHEMA = {  # what read_bank checks; a damaged manifest is one line naming the field
    "boundaries": (list, lambda v: len(v) >= 2 and all(isinstance(b, int) for b in v), "a list of >= 2 timesteps"),
    "adapter": (dict,),
    "task": (dict, lambda v: isinstance(v.get("name"), str), "an object with a task name"),
    "guide_fingerprint": (str,),
    "guide_fingerprints": (dict, lambda v: all(isinstance(f, str) for f in v.values()), "of fingerprints", False),
    "schedule": (dict, lambda v: isinstance(v.get("fingerprint"), str), "an object with a fingerprint"),
    "trained": (list, lambda v: all(isinstance(n, str) for n in v), "a list of expert names"),
    "files": (dict, None, "", False),
    "default_scale": ((float, type(None)), None, "", False),
}


@dataclass(frozen=True)
class SavedBank:
    """What a bank folder describes, checked: everything ``load_bank`` needs to rebuild the bank."""

    directory: Path
    router: TimestepRouter
    adapter: dict[str, Any]  # AdapterConfig's fields
    task: Task
    trained: list[str]  # names of the finished experts
    manifest: dict


def read_bank(
    directory: str | os.PathLike, guide_state: dict[str, Tensor], *, schedule: NoiseSchedule | None = None, require_all: bool = True
) -> SavedBank:
    """Read and check the bank saved in ``directory`` for a guide whose net has the weights
    ``guide_state``: that the guide and the schedule are the ones the experts were trained for,
    that every expert is finished (``require_all``), and every file against its recorded checksum."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    try:
        router = TimestepRouter(tuple(manifest["boundaries"]))
        adapter: dict[str, Any] = {k: tuple(v) if k == "target_modules" and v else v for k, v in manifest["adapter"].items()}
        task = make_task(**manifest["task"])
        trained, sched = list(manifest["trained"]), manifest["schedule"]
        if not isinstance(sched, dict) or not isinstance(trained, list):
            raise TypeError("schedule must be an object and trained a list")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise malformed(directory, e) from None
    if schedule is not None and sched.get("fingerprint") != schedule_fingerprint(schedule):
        raise PPAPError(
            f"experts in {directory} were trained for another noise schedule "
            f"(T={sched.get('num_train_timesteps')}) than this diffusion model's (T={schedule.num_train_timesteps})"
        )
    check_guide(guide_state, manifest, directory)
    missing = [expert_name(i) for i in range(router.num_experts) if expert_name(i) not in trained]
    if missing and require_all:
        raise PPAPError(f"experts in {directory} are unfinished ({missing[0]} not trained); re-run `ppap train` to finish them")
    for rel, digest in (manifest.get("files") or {}).items():
        path = directory / rel
        if not path.is_file():
            raise PPAPError(f"expert file {path} is missing")
        if file_sha256(path) != digest:
            raise PPAPError(f"expert file {path} does not match its checksum in {BANK_MANIFEST} (damaged or replaced)")
    return SavedBank(directory, router, adapter, task, trained, manifest)


def malformed(directory: Path, error: Exception) -> PPAPError:
    """The one-line error for a manifest whose fields do not describe a bank."""
    if isinstance(error, PPAPError):
        return PPAPError(f"{directory / BANK_MANIFEST} is malformed ({error})")
    return PPAPError(f"{directory / BANK_MANIFEST} is malformed ({type(error).__name__}: {error})")


def bank_folder(ref: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """A bank's local folder: a folder as it is, else a zoo bank's, else a hub id's snapshot."""
    from . import hub, zoo

    if Path(ref).is_dir():
        return hub.subfolder_of(Path(ref), subfolder, str(ref))
    if zoo.is_zoo_name(str(ref)):
        return hub.subfolder_of(zoo.get(str(ref), "experts").location, subfolder, str(ref))
    if hub.is_hub_id(str(ref)):
        return hub.hub_folder(str(ref), BANK_FILES, revision=revision, subfolder=subfolder)
    forms = f"a folder written by `ppap train`, a zoo name ({hub.zoo_names('experts')}) or {hub.HUB_FORM}"
    raise hub.not_found(str(ref), "experts directory", forms)


def save_pretrained_bank(
    bank: ExpertBank, directory: str | os.PathLike, *, schedule: NoiseSchedule | None = None, task: Task | None = None
) -> None:
    """``save_bank`` with what the bank recorded: its task, and the schedule, statistics and
    trained experts of the manifest it was loaded from (``schedule`` is needed otherwise)."""
    loaded = bank.manifest or {}
    task = task or bank.task
    if task is None:
        raise PPAPError("save_pretrained needs task= (the bank was neither loaded from disk nor trained)")
    if schedule is not None:
        if loaded and loaded["schedule"].get("fingerprint") != schedule_fingerprint(schedule):
            raise PPAPError("save_pretrained: the given schedule is not the one the experts were trained for")
        manifest = bank_manifest(bank, task, schedule, stats=loaded.get("stats", {}))
    elif loaded:
        manifest = loaded | {"format": BANK_FORMAT, "task": asdict(task), "trained": [], "files": {}}  # type: ignore[call-overload]
    else:
        raise PPAPError("save_pretrained needs schedule= (the diffusion model's NoiseSchedule) for a bank not loaded from disk")
    if bank.default_scale is not None:
        manifest["default_scale"] = bank.default_scale
    trained = loaded.get("trained") or [expert_name(i) for i in range(bank.router.num_experts)]
    for i in range(bank.router.num_experts):
        if expert_name(i) in trained:
            record_expert(manifest, bank, i, directory)
    atomic_write_json(Path(directory) / BANK_MANIFEST, manifest)


# --------------------------------------------------------------------------------------------
# one expert's files
# --------------------------------------------------------------------------------------------


def save_lora_expert(model: nn.Module, i: int, directory: str | os.PathLike) -> list[Path]:
    """Write adapter ``expert_i`` of the peft model ``model`` as
    ``directory/expert_i/{adapter_config.json, adapter_model.safetensors}`` (peft's layout)."""
    model.save_pretrained(str(directory), selected_adapters=[expert_name(i)], safe_serialization=True)  # type: ignore[operator]
    (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing useful
    folder = Path(directory) / expert_name(i)
    files = [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    for path in files:
        give_usual_permissions(path)  # peft saves through safetensors' save_file, which leaves 0600
    return files


def read_lora_expert(i: int, directory: str | os.PathLike, want: set[str]) -> dict[str, Tensor]:
    """Expert i's adapter weights from ``directory/expert_i``, keyed as ``want`` (the keys of
    the bank's own adapter state); a file written for another model is a one-line error."""
    path = Path(directory) / expert_name(i)
    state = load_safetensors(path / "adapter_model.safetensors")  # one-line errors for missing/corrupt
    legacy = "base_model.model.net."  # ppap-experts-v1 wrapped the model in a private "net" module
    if set(state) != want and all(k.startswith(legacy) for k in state):
        state = {"base_model.model." + k[len(legacy) :]: v for k, v in state.items()}
    if set(state) != want:
        extra = sorted(set(state) - want) or sorted(want - set(state))
        raise PPAPError(f"adapter {path} does not fit the guidance model (mismatched keys, e.g. {extra[0]})")
    return state


def save_full_expert(state: dict[str, Tensor], i: int, directory: str | os.PathLike) -> list[Path]:
    """Write a fully fine-tuned expert i as ``directory/expert_i/model.safetensors``."""
    path = Path(directory) / expert_name(i) / "model.safetensors"
    atomic_save_safetensors(path, state)
    return [path]


def load_full_expert(net: nn.Module, i: int, directory: str | os.PathLike) -> None:
    """Load ``directory/expert_i/model.safetensors`` into ``net`` (one-line errors)."""
    load_weights_into(net, Path(directory) / expert_name(i) / "model.safetensors")
