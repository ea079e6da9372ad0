"""The real huggingface_hub client, unmodified, against tests/fake_hub/server.LocalHub."""

from __future__ import annotations

import random
from pathlib import Path

import httpx2
import huggingface_hub.constants as hf_constants
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from fake_hub.fixtures import FAKE_TOKEN
from fake_hub.server import LocalHub, refused_endpoint

REPO_ID = "test-user/tiny-model"


def _make_folder(root: Path) -> dict[str, bytes]:
    """A small model folder: text files (committed inline) and binaries (uploaded through LFS)."""
    files = {
        "README.md": b"---\nlicense: mit\n---\n# Tiny model\n",
        "config.json": b'{"hidden_size": 8}\n',
        "model.safetensors": random.Random(0).randbytes(300 * 1024),
        # No LFS pattern matches *.png: the server picks LFS because the content is binary.
        "samples/grid.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + random.Random(1).randbytes(2048),
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _push(hub: LocalHub, tmp_path: Path, revision: str | None = None) -> tuple[dict[str, bytes], str]:
    api = HfApi(endpoint=hub.endpoint)
    api.create_repo(REPO_ID, repo_type="model", exist_ok=True, private=True)
    files = _make_folder(tmp_path / "folder")
    info = api.upload_folder(
        folder_path=tmp_path / "folder",
        repo_id=REPO_ID,
        commit_message="Upload tiny model",
        revision=revision,
        create_pr=False,
    )
    return files, info.oid


def test_create_repo_twice_with_exist_ok(local_hub: LocalHub, hub_env: str) -> None:
    api = HfApi(endpoint=hub_env)
    first = api.create_repo(REPO_ID, repo_type="model", exist_ok=True, private=True)
    second = api.create_repo(REPO_ID, repo_type="model", exist_ok=True, private=False)
    assert first.repo_id == second.repo_id == REPO_ID
    repo = local_hub.repo(REPO_ID)
    assert repo.private is True  # the second call did not touch the existing repo
    assert set(repo.files()) == {".gitattributes"}  # like the Hub, a new repo has one commit

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO_ID, exist_ok=False)
    assert excinfo.value.response.status_code == 409


def test_upload_folder_then_hf_hub_download(local_hub: LocalHub, hub_env: str, tmp_path: Path) -> None:
    files, commit_oid = _push(local_hub, tmp_path, revision=None)

    repo = local_hub.repo(REPO_ID)
    head = repo.head()
    assert head.oid == commit_oid and head.title == "Upload tiny model"
    assert repo.files() == {**files, ".gitattributes": repo.files()[".gitattributes"]}
    assert {p for p, f in head.files.items() if f.lfs} == {"model.safetensors", "samples/grid.png"}
    lfs_puts = [r for r in local_hub.requests if r.method == "PUT" and r.path.startswith("/__lfs__/upload/")]
    assert len(lfs_puts) == 2
    commits = [r for r in local_hub.requests if r.path.startswith(f"/api/models/{REPO_ID}/commit/")]
    assert [r.authorization for r in commits] == [f"Bearer {FAKE_TOKEN}"]

    for revision in (commit_oid, "main"):
        cache_dir = tmp_path / f"cache-{revision}"
        for name in ("config.json", "model.safetensors", "samples/grid.png"):
            path = hf_hub_download(REPO_ID, name, revision=revision, cache_dir=cache_dir, endpoint=hub_env)
            assert Path(path).read_bytes() == files[name]
            assert f"/snapshots/{commit_oid}/" in Path(path).as_posix()


def test_hub_env_redirects_the_default_client(local_hub: LocalHub, hub_env: str, tmp_path: Path) -> None:
    # No endpoint= / cache_dir=: the patched huggingface_hub.constants point at the server and tmp dir.
    HfApi().create_repo(REPO_ID)
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO_ID)
    path = Path(hf_hub_download(REPO_ID, "config.json"))
    assert path.read_bytes() == b"{}"
    assert path.is_relative_to(hf_constants.HF_HUB_CACHE) and hub_env in hf_constants.ENDPOINT


def test_snapshot_download_gets_the_whole_folder(local_hub: LocalHub, tmp_path: Path) -> None:
    files, commit_oid = _push(local_hub, tmp_path, revision="main")

    folder = snapshot_download(REPO_ID, cache_dir=tmp_path / "cache", endpoint=local_hub.endpoint)

    assert Path(folder).name == commit_oid
    downloaded = _read_tree(Path(folder))
    assert downloaded.pop(".gitattributes").startswith(b"*.7z filter=lfs")
    assert downloaded == files


def test_new_commit_keeps_old_revision(local_hub: LocalHub, tmp_path: Path) -> None:
    files, first_oid = _push(local_hub, tmp_path)
    api = HfApi(endpoint=local_hub.endpoint)
    second = api.upload_file(
        path_or_fileobj=b'{"hidden_size": 16}\n', path_in_repo="config.json", repo_id=REPO_ID, commit_message="v2"
    )
    assert second.oid != first_oid
    assert local_hub.repo(REPO_ID).head().parent == first_oid

    def download(revision: str) -> bytes:
        cache = tmp_path / f"cache-{revision}"
        path = hf_hub_download(REPO_ID, "config.json", revision=revision, cache_dir=cache, endpoint=api.endpoint)
        return Path(path).read_bytes()

    assert download(first_oid) == files["config.json"]
    assert download("main") == b'{"hidden_size": 16}\n'


def test_missing_repo_and_file(local_hub: LocalHub, tmp_path: Path) -> None:
    _push(local_hub, tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "nope.txt", cache_dir=tmp_path / "c1", endpoint=local_hub.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/missing", "config.json", cache_dir=tmp_path / "c2", endpoint=local_hub.endpoint)


def test_dataset_repo_roundtrip(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo("test-user/tiny-data", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id="test-user/tiny-data", repo_type="dataset"
    )
    path = hf_hub_download(
        "test-user/tiny-data", "data.csv", repo_type="dataset", cache_dir=tmp_path / "c", endpoint=api.endpoint
    )
    assert Path(path).read_bytes() == b"a,b\n1,2\n"


def test_fail_all_raises_http_500(local_hub: LocalHub, tmp_path: Path, no_retry_sleep: list[float]) -> None:
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo(REPO_ID)
    _make_folder(tmp_path / "folder")
    local_hub.fail_all = True

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(folder_path=tmp_path / "folder", repo_id=REPO_ID, commit_message="fails")
    assert excinfo.value.response.status_code == 500
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO_ID, exist_ok=True)
    assert excinfo.value.response.status_code == 500
    assert no_retry_sleep == []  # neither the README.md check nor create_repo retries

    # Downloads treat a 5xx as "Hub unreachable": with nothing cached, the client retries the
    # HEAD call with backoff, then raises LocalEntryNotFoundError (not HfHubHTTPError).
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO_ID, ".gitattributes", cache_dir=tmp_path / "cache", endpoint=api.endpoint)
    assert no_retry_sleep == [1, 2, 4, 8, 8]
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO_ID, cache_dir=tmp_path / "cache", endpoint=api.endpoint)


def test_refused_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_retry_sleep: list[float]) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # as fake_hub.fixtures.local_hub does
    endpoint = refused_endpoint()
    api = HfApi(endpoint=endpoint, token=FAKE_TOKEN)
    # The client is built on httpx2: a refused connection raises httpx2.ConnectError (not
    # HfHubHTTPError; both derive from httpx2.HTTPError).
    with pytest.raises(httpx2.ConnectError):
        api.create_repo(REPO_ID, exist_ok=True)
    _make_folder(tmp_path / "folder")
    with pytest.raises(httpx2.ConnectError):
        api.upload_folder(folder_path=tmp_path / "folder", repo_id=REPO_ID, commit_message="fails")
    assert no_retry_sleep == []
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO_ID, "config.json", cache_dir=tmp_path / "cache", endpoint=endpoint)
    assert len(no_retry_sleep) == 5
