"""Aliases: mutable names for immutable versions, changed only by compare-and-swap.

All aliases live in one JSON file, rewritten atomically under the store lock, so readers never
need the lock and two racing CAS calls with the same ``expected`` cannot both win. Who created
each alias (its owner) is kept beside it in ``alias_owners.json``, written first: an owner entry
counts only while its alias exists, and an alias missing from that file (a store older than
owners, or one written without an owner) has the owner ``""``, unknown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import EllipsisType

from filelock import BaseFileLock

from modelsurgery.checkpoints.atomic import atomic_write
from modelsurgery.checkpoints.errors import AliasConflictError, InvalidAliasError
from modelsurgery.checkpoints.layout import StoreLayout

ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
OWNERS_FILE = "alias_owners.json"

Expected = str | None | EllipsisType
# Called under the store lock with an existing alias's owner; raises to refuse the move.
Authorize = Callable[[str], None]


def check_alias_name(name: str) -> None:
    if not ALIAS_RE.fullmatch(name):
        raise InvalidAliasError(f"invalid alias {name!r}: must match {ALIAS_RE.pattern}")


class AliasTable:
    def __init__(self, layout: StoreLayout, lock: BaseFileLock) -> None:
        self.layout = layout
        self.lock = lock

    @property
    def owners_file(self) -> Path:
        return self.layout.aliases_file.with_name(OWNERS_FILE)

    @staticmethod
    def _read_json(path: Path) -> dict[str, str]:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}

    def read(self) -> dict[str, str]:
        return self._read_json(self.layout.aliases_file)

    def get(self, name: str) -> str | None:
        return self.read().get(name)

    def owner(self, name: str) -> str | None:
        """The owner of an existing alias (``""`` when unknown); None when there is none."""
        if name not in self.read():
            return None
        return self._read_json(self.owners_file).get(name, "")

    def _write(self, path: Path, table: dict[str, str]) -> None:
        data = json.dumps(dict(sorted(table.items())), indent=2).encode()
        atomic_write(path, data, self.layout.tmp)

    def _record_owner(self, name: str, owner: str) -> None:
        owners = self._read_json(self.owners_file)
        if owners.get(name, "") == owner:
            return
        if owner:
            owners[name] = owner
        else:
            owners.pop(name, None)
        self._write(self.owners_file, owners)

    @staticmethod
    def _check(name: str, current: str | None, expected: Expected) -> None:
        if expected is not ... and current != expected:
            raise AliasConflictError(f"alias {name!r} points to {current!r}, expected {expected!r}")

    def set(
        self,
        name: str,
        version_id: str,
        expected: Expected,
        *,
        owner: str = "",
        authorize: Authorize | None = None,
    ) -> None:
        """Move (or create) ``name``. ``owner`` is recorded when the alias is created; an
        existing alias keeps its owner and is moved only if ``authorize`` accepts it."""
        check_alias_name(name)
        with self.lock:
            table = self.read()
            current = table.get(name)
            if current is not None and authorize is not None:
                authorize(self._read_json(self.owners_file).get(name, ""))
            self._check(name, current, expected)
            if current is None:
                self._record_owner(name, owner)
            if current != version_id:
                table[name] = version_id
                self._write(self.layout.aliases_file, table)

    def delete(
        self, name: str, expected: Expected, *, authorize: Authorize | None = None
    ) -> str | None:
        """Remove ``name`` if ``authorize`` accepts its owner; the version it pointed to
        (None when there was no such alias)."""
        check_alias_name(name)
        with self.lock:
            table = self.read()
            current = table.get(name)
            if current is not None and authorize is not None:
                authorize(self._read_json(self.owners_file).get(name, ""))
            self._check(name, current, expected)
            if table.pop(name, None) is not None:
                self._write(self.layout.aliases_file, table)
                self._record_owner(name, "")
            return current

    def owners(self) -> dict[str, str]:
        """Each existing alias's owner (``""`` when unknown)."""
        owners = self._read_json(self.owners_file)
        return {name: owners.get(name, "") for name in self.read()}
