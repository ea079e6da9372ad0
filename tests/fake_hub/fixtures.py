"""Pytest fixtures that run a ``LocalHub`` (tests/fake_hub/server.py) for one test.

tests/conftest.py imports them, so every test module can simply ask for them by name.

* ``local_hub`` yields a started ``LocalHub`` and stops it after the test. It redirects
  nothing: pass ``endpoint=local_hub.endpoint`` to ``HfApi`` / ``hf_hub_download`` /
  ``snapshot_download``. The one client setting it does change, for the test only, is
  ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``: with ``hf_xet`` installed the
  client would otherwise upload through the Xet protocol, which LocalHub does not speak.
* ``hub_env`` (uses ``local_hub``) yields the endpoint string and points the environment at
  the server: HF_ENDPOINT, HF_HUB_OFFLINE=0, HF_HUB_DISABLE_TELEMETRY=1, HF_HUB_DISABLE_XET=1,
  HF_HOME / HF_HUB_CACHE in a tmp dir and HF_TOKEN="hf_test_token".

  huggingface_hub reads these variables once, at import time (``constants.ENDPOINT``,
  ``constants.HF_HUB_CACHE``, ...), so setting the environment is not enough inside this
  process. ``hub_env`` therefore also patches the matching ``huggingface_hub.constants``
  attributes, which covers code that reads them at call time; modules that copied a value
  at import (``from huggingface_hub.constants import HF_HUB_CACHE``, e.g. in diffusers) still
  see the old one. Passing ``endpoint=`` (and ``cache_dir=``) explicitly is the reliable way;
  the environment matters mostly for subprocesses. HF_TOKEN is read at call time, so the
  fake token is always sent (the server accepts any token).
* ``no_retry_sleep`` yields a list and makes the client's retry waits instant, recording each
  requested wait in the list. Use it in failure tests: on HTTP 5xx or a refused connection the
  client retries with backoff (5 retries, 1+2+4+8+8 s) in preupload, LFS batch/upload, tree
  listing, and in ``hf_hub_download`` when the file is not cached yet; without this fixture such
  a test spends about 23 s sleeping per call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import huggingface_hub.constants as hf_constants
import huggingface_hub.file_download as hf_file_download
import huggingface_hub.utils._http as hf_http
import pytest
from huggingface_hub.utils import close_session

from fake_hub.server import LocalHub

FAKE_TOKEN = "hf_test_token"


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    hub = LocalHub().start()
    try:
        yield hub
    finally:
        hub.stop()
        # Drop the client's pooled keep-alive connections to the stopped server.
        close_session()


@pytest.fixture
def hub_env(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> str:
    endpoint = local_hub.endpoint
    hf_home = tmp_path_factory.mktemp("hf_home")
    hub_cache = hf_home / "hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_TOKEN": FAKE_TOKEN,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The same settings as the constants computed at import (see module docstring).
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
    }.items():
        monkeypatch.setattr(hf_constants, name, value)
    return endpoint


@pytest.fixture
def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    # Both modules call `time.sleep(...)` through their module-level `time` import: swap that
    # reference only, so nothing else in the process stops sleeping.
    fake_time = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    fake_time.sleep = waits.append
    monkeypatch.setattr(hf_http, "time", fake_time)
    monkeypatch.setattr(hf_file_download, "time", fake_time)
    return waits
