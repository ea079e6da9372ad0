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

