"""Uploads of quantized checkpoints: a staging copy of the folder (links, plus the card and configs
rewritten for the target repo, with no local path) goes to the Hub with ``HfApi.upload_folder``,
each request under a timeout (docs/reliability.md). ``ModelCard.push_to_hub`` is not used: it
validates the card against a hard-coded huggingface.co address, which fails behind mirrors, on
private endpoints and offline (DESIGN.md section 8)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import set_client_factory

from ..config import CONFIG_NAME
from ..files import atomic_write_text
from ..folders import quantized_model_dir
from ..serialization import CheckpointError, read_json
from .card import CARD_NAME, card_for_repo, write_model_card
from .repo import check_repo_id, public_base_model
from .upload_files import select_upload, warn_skipped

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload diffusers-gaq quantized model"
# huggingface_hub's shared client has no timeout: a server that accepts the connection and never
# answers would hold a push forever. Seconds per request (connect, each read, each write).
DEFAULT_PUSH_TIMEOUT = 60.0
PUSH_TIMEOUT_ENV = "DIFFUSERS_GAQ_PUSH_TIMEOUT"


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local checkpoint folder is untouched.

    ``status_code`` is the HTTP status when the server answered, else None."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code

# ---- checks before a push ----------------------------------------------------------------------
def _check_checkpoint_folder(folder: Path) -> None:
    # A whole saved pipeline (model_index.json, unet/ or transformer/...) is a checkpoint too: its
    # quantized denoiser holds the config.
    qcfg = quantized_model_dir(folder) / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a diffusers-gaq checkpoint folder "
                              f"(made by save_pretrained, holding {CONFIG_NAME})")
    if not qcfg.is_file():
        raise CheckpointError(f"{qcfg} is missing: {folder} is not a diffusers-gaq checkpoint, refusing to push it")
    try:
        method = read_json(qcfg).get("quant_method")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; refusing to push a corrupt checkpoint") from None
    if method != "gaq":
        raise CheckpointError(f"{qcfg}: quant_method is {method!r}, not 'gaq'; not a diffusers-gaq checkpoint")


# ---- what is uploaded ------------------------------------------------------------------------


# Fields that may hold a local path, by file: diffusers' configs (every file), our quantization
# config, and the report of `diffusers-gaq evaluate` (its default folder is inside the checkpoint).
_PATH_KEYS = {CONFIG_NAME: ["base_model"], "evaluation.json": ["baseline"]}


def _public_json(path: Path) -> tuple[str | None, dict[str, str]]:
    """(the JSON file's text with its base model / ``_name_or_path`` made public, or None when it
    needs no change; {recorded value: public value} for each value replaced)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, {}  # not ours to judge here; uploaded as it is
    if not isinstance(data, dict):
        return None, {}
    keys = ["_name_or_path"] + _PATH_KEYS.get(path.name, [])
    replaced = {}
    for key in keys:
        value = data.get(key)
        public = public_base_model(value) if isinstance(value, str) else value
        if public != value:
            replaced[value] = public
            data[key] = public
    if not replaced:
        return None, {}
    # Key order as saved (quantization_config.json's layer order matters to readers).
    return json.dumps(data, indent=2) + "\n", replaced


def _staged_texts(folder: Path, files: list[str], repo_id: str) -> dict[str, str]:
    """{path relative to folder: text to upload instead of the file} for the files (of ``files``, the
    allow-listed ones) a push rewrites: JSON configs that record a local path, and README.md (repo
    id, and those paths made public). Older checkpoints recorded absolute paths; the upload must not
    publish them."""
    texts, replaced = {}, {}
    for path in (folder / rel for rel in files if rel.endswith(".json")):
        if path.stat().st_size < 1_000_000:  # configs are small; skip data files
            text, found = _public_json(path)
            if text is not None:
                texts[path.relative_to(folder).as_posix()] = text
                replaced.update(found)
    card = folder / CARD_NAME
    if CARD_NAME in files:
        text = card.read_text(encoding="utf-8")
        for recorded, public in sorted(replaced.items(), key=lambda kv: -len(kv[0])):  # longest first
            if re.search(r"[\\/]", recorded):  # a path; a bare name like "." must not be replaced everywhere
                text = text.replace(recorded, public or "")
        texts[CARD_NAME] = card_for_repo(text, repo_id)
    return texts


def _stage_for_upload(folder: Path, staging: Path, files: list[str], texts: dict[str, str]) -> None:
    """Mirror the allow-listed ``files`` of ``folder`` into ``staging``: links to the files as they
    are, fresh files for ``texts``. The upload reads the staging area, so only those files go up and
    the user's folder is never written to by a push."""
    for rel in files:
        path = folder / rel
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel in texts:
            target.write_text(texts[rel], encoding="utf-8")  # scratch copy, removed after the push
            continue
        try:
            os.symlink(path.resolve(), target)  # no copy of the (large) weights
        except OSError:  # symlinks not allowed (Windows without the privilege)
            shutil.copy2(path, target)


def _keep_uploaded_card(folder: Path, card_text: str | None) -> None:
    """After a successful push, the local card becomes the one uploaded (it names the repo), so
    the folder and the repo agree; nothing else in the folder is changed."""
    card = folder / CARD_NAME
    if card_text is None or not card.is_file():
        return
    try:
        if card.read_text(encoding="utf-8") != card_text:
            atomic_write_text(card, card_text)
            logger.info("updated %s to the card uploaded", card)
    except OSError as err:  # the push itself succeeded; a read-only folder must not turn it into a failure
        logger.warning("pushed, but could not update the local card %s: %s", card, err)


# ---- timeouts ---------------------------------------------------------------------------------
MAX_PUSH_TIMEOUT = 24 * 3600.0


def push_timeout(timeout: float | None = None) -> float:
    """Seconds per Hub request: ``timeout`` if given, else $DIFFUSERS_GAQ_PUSH_TIMEOUT, else 60."""
    source = "timeout="
    if timeout is None:
        raw = os.environ.get(PUSH_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_PUSH_TIMEOUT
        source = f"${PUSH_TIMEOUT_ENV}"
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{source} is {raw!r}, not a number of seconds; set it to e.g. 60 or unset it") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"{source} {timeout!r} is not a positive number of seconds; pass e.g. 60")
    if timeout > MAX_PUSH_TIMEOUT:  # the HTTP client and the OS refuse such waits only once the upload runs
        raise ValueError(f"{source} {timeout!r} is more than a day; pass at most {MAX_PUSH_TIMEOUT:.0f} seconds")
    return float(timeout)


@contextlib.contextmanager
def hub_client_timeout(seconds: float):
    """Make huggingface_hub's shared HTTP client time out after ``seconds`` per request, for the
    duration of the block, through its own hook (``set_client_factory``).

    The user's factory (proxies, certificates, hooks) is kept: its client is only given a timeout,
    and the factory is put back afterwards. huggingface_hub retries timeouts, network errors and
    HTTP 429/5xx itself, at most 5 times per request with waits of 1, 2, 4, 8, 8 s (except
    create_repo and the commit, which it does not retry), so each request ends within
    6 * ``seconds`` + 23 s. Other threads' Hub requests during the block get the timeout too."""

    # No public getter exists; fall back to the library default if the private name moves.
    previous = getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", hf_http.default_client_factory)

    def client_with_timeout():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(client_with_timeout)  # also closes the current shared client
    try:
        yield
    finally:
        set_client_factory(previous)


# ---- uploads ----------------------------------------------------------------------------------
def _failed_request(err: Exception) -> str:
    try:
        request = err.request  # httpx errors raise RuntimeError when they carry none
    except (AttributeError, RuntimeError):
        return ""
    return f" ({request.method} {str(request.url).split('?')[0]})"


def _push_error(err: Exception, stage: str, folder: Path, repo_id: str, endpoint: str,
                timeout: float | None = None) -> HubPushError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    hint = ""
    if isinstance(err, httpx2.TimeoutException):
        waited = "connect" if isinstance(err, httpx2.ConnectTimeout) else "answer"
        what = f"the server did not {waited} within {timeout:g} s ({type(err).__name__}){_failed_request(err)}"
        hint = (" Check the address (HF_ENDPOINT / --endpoint), the network and any proxy; on a slow link allow "
                f"more time per request with timeout= (CLI --timeout, or ${PUSH_TIMEOUT_ENV}).")
        if "/commit/" in _failed_request(err):
            hint += (" The commit was cut off while waiting and may still have been made: look at the repo "
                     "before retrying.")
        detail = ""
    else:
        what = f"HTTP {status}" if status else f"connection failed ({type(err).__name__})"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if status in (401, 403):
        hint = " The server refused the credentials: set HF_TOKEN (or pass token=) to a token with write access."
    message = (f"pushing {folder} to {repo_id!r} at {endpoint} failed during {stage}: {what}"
               f"{': ' + detail if detail else ''}.{hint} The local folder {folder} is intact; retry with "
               f"`diffusers-gaq push {folder} {repo_id}`, or set HF_TOKEN / HF_ENDPOINT if the token or server "
               "address is wrong.")
    return HubPushError(message, status_code=status)


class UploadFile(NamedTuple):
    """One file a push uploads: its path in the repo and its size in bytes as uploaded."""
    path: str
    size: int


def upload_plan(folder: str | os.PathLike, repo_id: str) -> tuple[list[UploadFile], dict[str, str]]:
    """(the files a push of ``folder`` to ``repo_id`` uploads, with their sizes; the texts it
    uploads in place of some of them). Reads the folder only; warns about the skipped paths."""
    check_repo_id(repo_id)
    folder = Path(folder)
    _check_checkpoint_folder(folder)
    selection = select_upload(folder)
    warn_skipped(folder, selection.skipped)
    texts = _staged_texts(folder, selection.upload, repo_id)
    plan = [UploadFile(rel, len(texts[rel].encode("utf-8")) if rel in texts else (folder / rel).stat().st_size)
            for rel in selection.upload]
    return plan, texts


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                endpoint: str | None = None, timeout: float | None = None, dry_run: bool = False):
    """Create ``repo_id`` if needed and upload a checkpoint folder; return the CommitInfo
    (``.commit_url``, ``.oid``, ``.pr_url`` when ``create_pr``). With ``dry_run=True`` nothing is
    sent: the list of UploadFile (path, size) the push would upload is returned.

    Only the checkpoint's own files are uploaded (upload_files.py: an allow-list; symbolic links,
    hidden files and anything else are skipped with a warning that lists them). The repo id, the
    folder and ``timeout`` are checked before any request. What is uploaded is a staging copy: the
    card names ``repo_id`` and no file records a local absolute path (see public_base_model). Each
    request times out after ``timeout`` seconds (default $DIFFUSERS_GAQ_PUSH_TIMEOUT or 60;
    hub_client_timeout). Network, HTTP and timeout failures raise HubPushError and leave the folder
    byte-identical; after a successful push its README.md is replaced by the card uploaded."""
    folder = Path(folder)
    seconds = push_timeout(timeout)
    plan, texts = upload_plan(folder, repo_id)
    if dry_run:
        return plan
    # endpoint=None lets huggingface_hub resolve HF_ENDPOINT (or huggingface.co) itself.
    api = HfApi(endpoint=endpoint or None, token=token)
    network_errors = (httpx2.HTTPError, ConnectionError, TimeoutError)
    with tempfile.TemporaryDirectory(prefix="diffusers-gaq-push-") as tmp:
        staging = Path(tmp) / folder.resolve().name
        staging.mkdir()
        _stage_for_upload(folder, staging, [f.path for f in plan], texts)
        stage = "create_repo"
        try:
            with hub_client_timeout(seconds):
                api.create_repo(repo_id, private=private, exist_ok=True)
                stage = "upload_folder"
                info = api.upload_folder(folder_path=staging, repo_id=repo_id, revision=revision,
                                         create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
        except network_errors as err:
            raise _push_error(err, stage, folder, repo_id, api.endpoint, seconds) from err
    _keep_uploaded_card(folder, texts.get(CARD_NAME))
    logger.info("pushed %s to %s (%s)", folder, repo_id, getattr(info, "commit_url", info))
    return info


def push_quantized(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                   revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                   endpoint: str | None = None, save_directory: str | os.PathLike | None = None,
                   base_model: str | None = None, license: str | None = None, timeout: float | None = None):
    """Save ``model`` (with a model card naming ``repo_id``) and push it with push_folder
    (``timeout``: seconds per request, see push_folder).

    With ``save_directory`` the checkpoint stays there (also when the push fails); without it
    a temporary folder is used and removed afterwards."""
    check_repo_id(repo_id)  # fail before spending time on the save
    push_timeout(timeout)

    def save_and_push(folder: Path):
        # The card is written after the save so that it can name the repo the files go to.
        model.save_pretrained(folder, model_card=False)
        write_model_card(model, folder, repo_id=repo_id, base_model=base_model, license=license)
        return push_folder(folder, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                           commit_message=commit_message, endpoint=endpoint, timeout=timeout)

    if save_directory is not None:
        return save_and_push(Path(save_directory))
    with tempfile.TemporaryDirectory(prefix="diffusers-gaq-push-") as tmp:
        return save_and_push(Path(tmp) / "checkpoint")
