"""The server's secrets kept from other processes (issue 29): bearer tokens passed in the
environment are gone from /proc/<pid>/environ of the server (unsetenv alone leaves them there)
and from its children, and embedded Ray's token file is readable by its user only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from modelsurgery.server import credentials, ray_pool
from modelsurgery.server.auth import TOKENS_ENV

SECRET = "alice:admin:hunter2-token-0123456789"
# Run in a fresh interpreter: only a process started with the variable has it in the block
# /proc shows.
TAKE = f"""
import subprocess
from modelsurgery.server.credentials import take_from_environment
print(take_from_environment({TOKENS_ENV!r}))
print("hunter2" in open("/proc/self/environ", "rb").read().decode())
print("hunter2" in subprocess.run(["env"], capture_output=True, text=True).stdout)
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="no /proc")
def test_a_token_taken_from_the_environment_leaves_no_trace() -> None:
    env = {**os.environ, TOKENS_ENV: SECRET, "OTHER_SETTING": "kept"}
    done = subprocess.run(
        [sys.executable, "-c", TAKE], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[:3] == [SECRET, "False", "False"], done.stdout


def test_the_servers_take_tokens_out_of_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``apply --local``'s settings (and the server's start and run) take them this way."""
    from modelsurgery.server.embedded import local_settings

    erased: list[str] = []
    monkeypatch.setattr(credentials, "_erase_initial", erased.append)
    monkeypatch.setenv(TOKENS_ENV, SECRET)
    local_settings(Path("/nonexistent/store"), Path("spec.json"), "")
    assert erased == [TOKENS_ENV] and TOKENS_ENV not in os.environ


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", *credentials.RAY_AUTH_ENVS):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_embedded_ray_finds_a_private_token_file(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start_ray`` writes the token file (0600) before ``ray.init`` would write it with the
    umask's mode."""
    seen: list[tuple[int, int]] = []
    token = home / ".ray" / "auth_token"

    def init(**_kwargs: object) -> None:
        seen.append((mode(token), len(token.read_text())))

    monkeypatch.setattr(ray_pool.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_pool.ray, "init", init)
    assert ray_pool.start_ray(None, 1)
    assert seen == [(0o600, 64)]


def test_an_existing_token_file_is_made_private_and_kept(home: Path) -> None:
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("operator-token")
    token.chmod(0o644)
    credentials.private_ray_token()
    assert (mode(token), token.read_text()) == (0o600, "operator-token")


@pytest.mark.parametrize(
    ("name", "value"), [("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN", "t")]
)
def test_no_token_file_when_the_operator_chose(
    home: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    credentials.private_ray_token()
    assert not (home / ".ray" / "auth_token").exists()
