"""Model references -> local folders: a folder, a zoo name, or a Hugging Face Hub id.

Wherever ppap takes a model (``--diffusion``, ``--guide``, ``--experts``, the loaders and the
``from_pretrained`` methods), a reference is resolved in this order:

1. a local folder, used as it is;
2. a zoo name (``ppap zoo list``);
3. a hub id ``org/name``, optionally pinned as ``org/name@revision`` (a branch, tag or commit
   hash); ``revision=`` / ``--revision`` applies to hub ids that name no revision of their own.

Hub files come through ``huggingface_hub.snapshot_download``, as diffusers and transformers get
them: into the HF cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``), with the token of
``HF_TOKEN`` or ``hf auth login``, and from the cache alone when ``HF_HUB_OFFLINE=1``. Only JSON
configs and ``.safetensors`` weights are downloaded: ppap never fetches or unpickles ``.bin`` /
``.pt`` / ``.ckpt`` files. huggingface_hub is imported only when a hub id is resolved.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .diffusion import SCHEDULER_CONFIG
from .io import PPAPError

# org/name as the Hub spells them (letters, digits, "-", "_", "."), then an optional @revision
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*)(?:@(?P<revision>[^\s@]+))?")
HUB_FORM = "a hub id org/name[@revision]"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
UNET_WEIGHTS = "diffusion_pytorch_model"  # diffusers' weights name (model.safetensors for transformers)


def parse_hub_id(ref: str, revision: str | None = None) -> tuple[str, str | None] | None:
    """``'org/name'`` or ``'org/name@rev'`` -> ``(repo_id, revision)``, the reference's own
    revision first, else ``revision``; None when ``ref`` is not a hub id."""
    m = HUB_ID.fullmatch(str(ref))
    if m is None or len(m["repo"]) > 96 or any(bad in m["repo"] for bad in ("--", "..")):
        return None
    return m["repo"], m["revision"] or revision


def is_hub_id(ref: str) -> bool:
    return parse_hub_id(ref) is not None


def zoo_names(kind: str) -> str:
    """The zoo's names of one kind, for error messages."""
    from . import zoo

    return ", ".join(n for n, e in zoo.ZOO.items() if e.kind == kind)


def not_found(ref: str, what: str, forms: str) -> PPAPError:
    """The one-line error for a reference that is none of the accepted forms."""
    return PPAPError(f"{what} not found: {ref} (give {forms})")


def weight_patterns(stem: str, variant: str | None = None) -> list[str]:
    """File-name patterns of a model's safetensors weights, one file or shards (diffusers'
    ``variant``: ``fp16`` picks ``{stem}.fp16.safetensors``)."""
    if variant:
        return [f"{stem}.{variant}.safetensors", f"{stem}.{variant}-*.safetensors", f"{stem}-*.{variant}.safetensors"]
    return [f"{stem}.safetensors", f"{stem}-?????-of-?????.safetensors"]


def require_safetensors(folder: Path, stem: str, variant: str | None = None) -> None:
    """One-line errors when ``folder`` holds no safetensors weights ``stem`` (of ``variant``)."""
    if any(any(folder.glob(p)) for p in weight_patterns(stem, variant)):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise PPAPError(f"{folder} holds only pickled weights ({pickles[0]}); ppap loads .safetensors weights only, never pickles")
    want = weight_patterns(stem, variant)[0]
    raise PPAPError(f"{folder} has no {want} (ppap loads .safetensors weights only; variant: {variant or 'none'})")


def download(ref: str, patterns: Sequence[str], *, revision: str | None = None) -> Path:
    """The snapshot folder of hub id ``ref`` in the HF cache, with the files matching
    ``patterns`` (fnmatch on repo paths) fetched unless offline. One-line errors for an id that
    is not cached while offline, an unknown repo or revision, a gated repo, no connection."""
    parsed = parse_hub_id(ref, revision)
    if parsed is None:
        raise PPAPError(f"{ref!r} is not a hub id (org/name or org/name@revision)")
    repo_id, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (  # re-exported there by every huggingface_hub version
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(constants.HF_HUB_OFFLINE)
    at = f" (revision {revision})" if revision else ""
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns), local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            raise PPAPError(
                f"{ref} is not a local folder, and hub model {repo_id}{at} is not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE} while HF_HUB_OFFLINE is set: fetch it with `{fetch}` or unset HF_HUB_OFFLINE"
            ) from None
        raise PPAPError(
            f"cannot reach the Hugging Face Hub for {repo_id}{at}, and it is not in the cache {constants.HF_HUB_CACHE}: "
            f"check the connection (or fetch it with `{fetch}` where there is one)"
        ) from None
    except RevisionNotFoundError:
        raise PPAPError(f"hub model {repo_id} has no revision {revision!r}") from None
    except GatedRepoError:
        raise PPAPError(f"hub model {repo_id} is gated: accept its terms on huggingface.co, then `hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise PPAPError(
            f"{ref} is not a local folder, and the Hugging Face Hub has no model {repo_id} "
            "(a private one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        raise PPAPError(f"Hugging Face Hub error for {repo_id}: {str(e).splitlines()[0][:200]}") from None
    return Path(folder)


def subfolder_of(root: Path, subfolder: str | None, name: str) -> Path:
    """``root / subfolder``, which must be a folder inside ``root``."""
    if not subfolder:
        return root
    if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
        raise PPAPError(f"subfolder must be a relative path inside the model, got {subfolder!r}")
    folder = root / subfolder
    if not folder.is_dir():
        raise PPAPError(f"{name} has no subfolder {subfolder!r}")
    return folder


def hub_folder(ref: str, patterns: Sequence[str], *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """The local folder of hub id ``ref`` (its ``subfolder``) with ``patterns`` fetched there."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    root = download(ref, [prefix + p for p in patterns], revision=revision)
    return subfolder_of(root, subfolder, ref)


def diffusers_layout(root: Path, subfolder: str | None = None, name: str | None = None) -> tuple[Path, Path]:
    """``(UNet folder, scheduler config)`` of a diffusers model: a pipeline folder (``unet/`` +
    ``scheduler/``) or a UNet folder (``config.json``) with ``scheduler_config.json`` beside it.
    With ``subfolder`` (diffusers' meaning: where the model sits in the repo) the UNet is in
    ``root/subfolder`` and the scheduler config beside it, else in ``root/scheduler/`` or ``root``."""
    base = subfolder_of(root, subfolder, name or str(root))
    if (base / "unet").is_dir():
        return base / "unet", base / "scheduler" / SCHEDULER_CONFIG
    candidates = [base / SCHEDULER_CONFIG]
    if subfolder:
        candidates += [root / "scheduler" / SCHEDULER_CONFIG, root / SCHEDULER_CONFIG]
    return base, next((c for c in candidates if c.is_file()), candidates[0])


TEXT_FILES = ["text_encoder/" + p for p in weight_patterns("model")] + ["tokenizer/*.txt"]  # besides the JSON configs


def download_diffusion(ref: str, *, revision: str | None = None, subfolder: str | None = None, variant: str | None = None) -> Path:
    """A diffusers model's snapshot: every JSON config first (to find the UNet), then the UNet's
    safetensors weights of ``variant`` only, and a pipeline's text encoder weights and tokenizer
    files when its ``model_index.json`` names a text encoder, from the same commit. Returns the
    snapshot root."""
    root = download(ref, ["*.json"], revision=revision)
    unet_dir, _ = diffusers_layout(root, subfolder, ref)
    rel = unet_dir.relative_to(root).as_posix()
    prefix = "" if rel == "." else rel + "/"
    patterns = [prefix + p for p in weight_patterns(UNET_WEIGHTS, variant)]
    if subfolder is None and _names_text_encoder(root / "model_index.json"):
        patterns += TEXT_FILES
    # the snapshot folder is named by its commit hash: the weights come from that very commit
    return download(parse_hub_id(ref)[0], patterns, revision=root.name)  # type: ignore[index]


def _names_text_encoder(index_file: Path) -> bool:
    from .io import read_json

    entry = read_json(index_file, "pipeline index").get("text_encoder") if index_file.is_file() else None
    return isinstance(entry, list) and len(entry) == 2 and bool(entry[1])
