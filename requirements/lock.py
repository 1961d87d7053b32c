"""Install and verify ``requirements.lock`` (pip-compile's output, with hashes) in this venv.

torch is the one locked package that is not forced: ``make setup`` installs
``requirements/torch.txt`` only when no torch is importable, so a CUDA build a user already has
stays. Everything else is installed exactly (``--no-deps --require-hashes``), and ``check``
fails when an installed version differs from the lock.

    python requirements/lock.py install requirements.lock
    python requirements/lock.py check requirements.lock      # exit 1 on any difference
    python requirements/lock.py diff requirements.lock       # report only (make test-latest)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

NOT_FORCED = frozenset({"torch"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def canonicalize_name(name: str) -> str:
    """PEP 503 normalisation (this runs before ``packaging`` is installed)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_blocks(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, the lines of its entry: pin, hashes, comments)."""
    blocks: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            current = [line]
            blocks[canonicalize_name(match.group(1))] = (match.group(2), current)
        elif current is not None and line.startswith((" ", "\t")):
            current.append(line)
        else:
            current = None
    return blocks


def install(lock: Path) -> None:
    """pip install every locked package but torch, exactly and hash-checked."""
    lines = [
        line
        for name, (_, block) in locked_blocks(lock).items()
        if name not in NOT_FORCED
        for line in block
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(lines) + "\n")
    try:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes"]
        subprocess.run([*command, "-r", handle.name], check=True)
    finally:
        Path(handle.name).unlink()


def differences(lock: Path) -> list[str]:
    """Locked packages whose installed version is another one (or missing)."""
    from packaging.version import Version  # installed from the lock by now

    found = []
    for name, (pinned, _) in sorted(locked_blocks(lock).items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            found.append(f"{name}: locked {pinned}, not installed")
            continue
        if name in NOT_FORCED:
            if Version(installed).release != Version(pinned).release:
                print(f"note: {name} {installed} kept (locked {pinned})")
            continue
        if Version(installed) != Version(pinned):
            found.append(f"{name}: locked {pinned}, installed {installed}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "check", "diff"])
    parser.add_argument("lock", type=Path)
    args = parser.parse_args()
    if args.action == "install":
        install(args.lock)
        return 0
    found = differences(args.lock)
    for line in found:
        print(line)
    if args.action == "check":
        if found:
            print(f"{len(found)} installed versions differ from {args.lock}", file=sys.stderr)
            return 1
        print(f"installed versions equal {args.lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
