"""Aliases: mutable names for immutable versions, changed only by compare-and-swap.

All aliases live in one JSON file, rewritten atomically under the store lock, so readers never
need the lock and two racing CAS calls with the same ``expected`` cannot both win.
"""

from __future__ import annotations

import json
import re
from types import EllipsisType

from filelock import BaseFileLock

from modelsurgery.checkpoints.atomic import atomic_write
from modelsurgery.checkpoints.errors import AliasConflictError, InvalidAliasError
from modelsurgery.checkpoints.layout import StoreLayout

ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Expected = str | None | EllipsisType


def check_alias_name(name: str) -> None:
    if not ALIAS_RE.fullmatch(name):
        raise InvalidAliasError(f"invalid alias {name!r}: must match {ALIAS_RE.pattern}")


class AliasTable:
    def __init__(self, layout: StoreLayout, lock: BaseFileLock) -> None:
        self.layout = layout
        self.lock = lock

    def read(self) -> dict[str, str]:
        try:
            return json.loads(self.layout.aliases_file.read_bytes())
        except FileNotFoundError:
            return {}

    def get(self, name: str) -> str | None:
        return self.read().get(name)

    def _write(self, table: dict[str, str]) -> None:
        data = json.dumps(dict(sorted(table.items())), indent=2).encode()
        atomic_write(self.layout.aliases_file, data, self.layout.tmp)

    @staticmethod
    def _check(name: str, current: str | None, expected: Expected) -> None:
        if expected is not ... and current != expected:
            raise AliasConflictError(f"alias {name!r} points to {current!r}, expected {expected!r}")

    def set(self, name: str, version_id: str, expected: Expected) -> None:
        check_alias_name(name)
        with self.lock:
            table = self.read()
            self._check(name, table.get(name), expected)
            if table.get(name) != version_id:
                table[name] = version_id
                self._write(table)

    def delete(self, name: str, expected: Expected) -> None:
        check_alias_name(name)
        with self.lock:
            table = self.read()
            self._check(name, table.get(name), expected)
            if table.pop(name, None) is not None:
                self._write(table)
