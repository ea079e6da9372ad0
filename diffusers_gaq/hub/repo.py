"""Hub repo ids, and what may be published about where a base model came from."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..reference import PIPELINE_DIR

_EXAMPLE_REPO_ID = "my-username/ddpm-cifar10-w4a8"
# What the embedded reference pipeline is recorded as (the CLI's name for it), not its install path.
REFERENCE_BASE_MODEL = "reference"


def check_repo_id(repo_id) -> str:
    """Return ``repo_id`` if huggingface_hub accepts it as "name" or "namespace/name", else
    raise ValueError saying what is wrong and showing a valid id."""
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected a non-empty string such as {_EXAMPLE_REPO_ID!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).replace(" Use `repo_type` argument if needed.", "")  # not an option here
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {reason} A valid id looks like {_EXAMPLE_REPO_ID!r} "
                         "(namespace/name, letters, digits, '-', '_' and '.').") from None
    return repo_id


def is_repo_id(value: str | None) -> bool:
    try:
        return bool(value) and check_repo_id(value) == value and not Path(value).exists()
    except ValueError:
        return False


def is_hub_id(value: str | None) -> bool:
    """A base model the card may link to and name in its metadata: "namespace/name" only, since a
    local folder's recorded name ("my-model") looks like a namespace-less Hub id."""
    return bool(value) and "/" in value and is_repo_id(value)


# A file of the huggingface_hub cache: .../models--namespace--name/snapshots/<sha>/...
_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|[\\/])models--(?P<repo>[^\\/]+)[\\/]snapshots(?:[\\/]|$)")


def _is_reference_pipeline(path: Path) -> bool:
    try:
        return path.resolve() == PIPELINE_DIR.resolve()
    except OSError:
        return False


def public_base_model(name_or_path) -> str | None:
    """What may be published about where a base model came from: the Hub id when it came from the
    Hub (also when it was read from the huggingface_hub cache), ``"reference"`` for the embedded
    reference pipeline, else only the folder's name.

    The model card and quantization_config.json are uploaded by a push; an absolute path there
    would publish the user's directory layout (user name, project names)."""
    if not name_or_path:
        return None
    text = str(name_or_path).strip()
    cached = _HF_CACHE_SNAPSHOT.search(text)
    if cached:
        return cached.group("repo").replace("--", "/")  # repo ids never contain "--"
    local = Path(text).expanduser()
    if _is_reference_pipeline(local):
        return REFERENCE_BASE_MODEL
    if local.exists():
        return local.resolve().name or text
    if is_repo_id(text):
        return text
    # A path that no longer exists (an older checkpoint): its last part, on any OS's separators.
    return re.split(r"[\\/]", text.rstrip("\\/"))[-1] or None



def cached_snapshot_origin(folder: Path) -> tuple[str, str, str | None, Path] | None:
    """(repo id, revision, subfolder, cache dir) of a folder inside huggingface_hub's cache, laid out as
    ``<cache>/models--<namespace>--<name>/snapshots/<commit>/<subfolder>``; None for any other folder."""
    parts = Path(folder).absolute().parts
    if "snapshots" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    if at < 1 or at + 1 >= len(parts) or not parts[at - 1].startswith("models--"):
        return None
    repo_id = parts[at - 1][len("models--"):].replace("--", "/")
    subfolder = "/".join(parts[at + 2:]) or None
    return repo_id, parts[at + 1], subfolder, Path(*parts[: at - 1])


def fetch_beside(folder: Path, required: list[str], optional: list[str] = ()) -> bool:
    """Download files a cached Hub snapshot folder lacks, from the same repo and commit, into it.

    diffusers' ``ModelMixin.from_pretrained(repo_id)`` fetches only ``config.json`` and the weights;
    a diffusers-gaq checkpoint needs its ``quantization_config.json`` beside them. Returns False when
    ``folder`` is not in the Hub cache. The endpoint and token are huggingface_hub's (HF_ENDPOINT,
    HF_TOKEN or the saved login)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    origin = cached_snapshot_origin(folder)
    if origin is None:
        return False
    repo_id, revision, subfolder, cache_dir = origin
    for name in [*required, *optional]:
        if (Path(folder) / name).is_file():
            continue
        try:
            hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
        except EntryNotFoundError:
            if name in required:
                raise
    return True
