"""Exported folders of immutable versions, as DownloadVersion serves them.

A folder is built once (temp folder + rename) and reused. The sha256 of every file, and of every
``PIECE_SIZE`` piece of it, is computed when the folder is built, in the building thread (never
on the event loop), and kept in ``<version id>.files.json`` beside the folder, so a download
starts streaming at once and a restarted server does not hash the folder again. Piece digests
let a client fetch ranges of a file in parallel and check each as it completes.

The folders together stay under ``max_bytes`` (``serve --max-export-bytes``): after a build, the
least recently used folders go first, never one a download has pinned; a folder evicted is
built again when next asked for. Use order is kept in memory and survives a restart as each
folder's mtime (touched on use). Anything left by a kill (a ``.partial-`` folder of a build or
an eviction, a listing's temp file) is removed when the cache is opened.

A version has up to two exports: whole (folder ``<version id>``), for callers who may see the
training data of every version in its lineage, and redacted (``<version id>.redacted``) for
everyone else: ``modelsurgery.json`` and the card show each operation's inline data as a
summary (``convert.without_inline_data``) and the stored evaluation suite is left out. Each is
cached under its own name, so neither is ever served in place of the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.evaluation.suite import SUITE_ARTIFACT
from modelsurgery.proto.limits import DEFAULT_MAX_EXPORT_BYTES
from modelsurgery.server.convert import without_inline_data
from modelsurgery.v1 import checkpoints_pb2

PIECE_SIZE = 16 << 20
LISTING_SUFFIX = ".files.json"
PARTIAL_PREFIX = ".partial-"
REDACTED_SUFFIX = ".redacted"
# Stored files a redacted export leaves out: the suite holds the facts and pairs themselves.
REDACTED_FILES = frozenset({SUITE_ARTIFACT})
_HASH_BLOCK = 4 << 20


def sha256_range(path: Path, offset: int, length: int) -> str:
    """sha256 of ``length`` bytes of ``path`` from ``offset``, read into one reused buffer."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(max(1, min(_HASH_BLOCK, length))))
    with path.open("rb", buffering=0) as handle:
        handle.seek(offset)
        while length:
            count = handle.readinto(view[: min(len(view), length)])
            if not count:
                raise OSError(f"{path.name} is shorter than expected")
            digest.update(view[:count])
            length -= count
    return digest.hexdigest()


def digest_files(folder: Path, piece_size: int = PIECE_SIZE) -> list[checkpoints_pb2.ExportedFile]:
    """The listing of ``folder``: path, size, sha256 and piece digests of every file, hashed on
    a thread pool (hashlib releases the GIL): each file's whole digest is one task, each of its
    pieces another, so a large file is hashed twice but not in twice the time."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1) + 1) as pool:
        tasks: list[tuple[Path, int, Future[str], list[Future[str]]]] = []
        for path in paths:
            size = path.stat().st_size
            whole = pool.submit(sha256_range, path, 0, size)
            pieces = (
                [
                    pool.submit(sha256_range, path, start, min(piece_size, size - start))
                    for start in range(0, size, piece_size)
                ]
                if size > piece_size
                else []
            )
            tasks.append((path, size, whole, pieces))
        listing = []
        for path, size, whole, pieces in tasks:
            digest = whole.result()
            listing.append(
                checkpoints_pb2.ExportedFile(
                    path=path.relative_to(folder).as_posix(),
                    size=size,
                    sha256=digest,
                    piece_size=piece_size,
                    piece_sha256=[p.result() for p in pieces] or ([digest] if size else []),
                )
            )
    return listing


def _to_json(files: list[checkpoints_pb2.ExportedFile]) -> str:
    return json.dumps(
        [
            {
                "path": f.path,
                "size": f.size,
                "sha256": f.sha256,
                "piece_size": f.piece_size,
                "piece_sha256": list(f.piece_sha256),
            }
            for f in files
        ]
    )


def export_name(version_id: str, with_data: bool = True) -> str:
    """The cache's name for a version's export: whole, or redacted (``with_data=False``)."""
    return version_id if with_data else f"{version_id}{REDACTED_SUFFIX}"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _partial_name(name: str, what: str = "") -> str:
    """``.partial-<export name>-<what>-<pid>-<nonce>``: the pid says whether its writer
    lives."""
    parts = [name, what, str(os.getpid()), uuid.uuid4().hex[:8]]
    return PARTIAL_PREFIX + "-".join(p for p in parts if p)


def _writer_alive(name: str) -> bool:
    """Whether the process that made a leftover still runs (another server sharing the home,
    mid-export); entries older than a day count as abandoned whatever their pid."""
    fields = name.rsplit("-", 2)
    if len(fields) != 3 or not fields[1].isdigit():
        return False
    try:
        os.kill(int(fields[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(root: Path) -> None:
    """What a killed build or eviction left: ``.partial-`` folders and listing temp files,
    unless their writer still runs (a server sharing this home) and they are recent."""
    day_ago = time.time() - 86400
    for entry in root.iterdir():
        leftover = (entry.name.startswith(PARTIAL_PREFIX) and entry.is_dir()) or (
            entry.name.startswith(".") and f"{LISTING_SUFFIX}-" in entry.name
        )
        if not leftover:
            continue
        with contextlib.suppress(FileNotFoundError):
            if _writer_alive(entry.name) and entry.stat().st_mtime > day_ago:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


class ExportCache:
    """Exported folders and their listings, each built once, bounded in bytes; safe to call
    from threads."""

    def __init__(
        self,
        root: Path,
        store: CheckpointStore,
        piece_size: int = PIECE_SIZE,
        max_bytes: int = DEFAULT_MAX_EXPORT_BYTES,
    ) -> None:
        self.root = root
        self.store = store
        self.piece_size = piece_size
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._listings: dict[str, list[checkpoints_pb2.ExportedFile]] = {}
        # Pins (downloads streaming a folder) have their own lock: pinning never waits for a
        # build, so the event loop may pin.
        self._pin_lock = threading.Lock()
        self._pins: Counter[str] = Counter()
        # Order of use in this process (the file system's clock is too coarse to tell two
        # uses in a row apart); folders unused since the start go by mtime, before these.
        self._uses = itertools.count()
        self._last_use: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)

    @contextmanager
    def pinned(self, version_id: str, with_data: bool = True) -> Iterator[None]:
        """While held, the export's folder is not evicted (pin before reading the listing)."""
        name = export_name(version_id, with_data)
        with self._pin_lock:
            self._pins[name] += 1
        try:
            yield
        finally:
            with self._pin_lock:
                self._pins[name] -= 1
                if not self._pins[name]:
                    del self._pins[name]

    def path(self, version_id: str, with_data: bool = True) -> Path:
        """Where the export's folder is (or will be once built)."""
        return self.root / export_name(version_id, with_data)

    def folder(self, version_id: str, with_data: bool = True) -> Path:
        self.listing(version_id, with_data)
        return self.path(version_id, with_data)

    def cached(
        self, version_id: str, with_data: bool = True
    ) -> list[checkpoints_pb2.ExportedFile] | None:
        """The listing if this process has it and the folder is still there (no hashing)."""
        name = export_name(version_id, with_data)
        files = self._listings.get(name)
        if files is None or not (self.root / name).is_dir():
            return None
        self._touch(name)
        return files

    def _touch(self, name: str) -> None:
        """Mark a use: eviction goes least recently used first."""
        self._last_use[name] = next(self._uses)
        with contextlib.suppress(OSError):
            os.utime(self.root / name)

    def listing(
        self, version_id: str, with_data: bool = True
    ) -> list[checkpoints_pb2.ExportedFile]:
        """The folder's listing, building the folder and its digests the first time (this
        blocks: call it in a thread). ``with_data=False``: the redacted export."""
        name = export_name(version_id, with_data)
        with self._lock:
            files = self.cached(version_id, with_data)
            if files is None:
                files = self._load_or_build(version_id, with_data)
                self._listings[name] = files
                self._touch(name)
                self._evict(keep=name)
            return files

    def total_bytes(self) -> int:
        return sum(folder[-1] for folder in self._folders())

    def _folders(self) -> list[tuple[int, float, str, int]]:
        """(use order, mtime, export name, bytes) of every exported folder."""
        folders = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            files = self._listings.get(entry.name)
            size = sum(f.size for f in files) if files is not None else folder_bytes(entry)
            use = self._last_use.get(entry.name, -1)
            folders.append((use, entry.stat().st_mtime, entry.name, size))
        return folders

    def _evict(self, keep: str) -> None:
        """Least recently used folders out until the rest fit ``max_bytes`` (never ``keep``
        or a pinned one: those may leave the cache over its bound until they are released)."""
        folders = sorted(self._folders())
        total = sum(size for *_, size in folders)
        for *_, name, size in folders:
            if total <= self.max_bytes:
                return
            with self._pin_lock:
                if name == keep or self._pins[name]:
                    continue
                # Renamed first: a folder that exists is whole, and a kill mid-removal leaves
                # a .partial- folder that the next start removes.
                doomed = self.root / _partial_name(name, "evicted")
                (self.root / name).rename(doomed)
            self._listings.pop(name, None)
            self._last_use.pop(name, None)
            self._listing_path(name).unlink(missing_ok=True)
            shutil.rmtree(doomed, ignore_errors=True)
            total -= size

    def _load_or_build(
        self, version_id: str, with_data: bool
    ) -> list[checkpoints_pb2.ExportedFile]:
        name = export_name(version_id, with_data)
        target = self.root / name
        if target.is_dir():
            files = self._read_listing(name)
            if files is None:
                files = digest_files(target, self.piece_size)
                self._write_listing(name, files)
            return files
        partial = self.root / _partial_name(name)
        try:
            if with_data:
                self.store.export(version_id, partial)
            else:
                self.store.export(
                    version_id, partial, shown=without_inline_data, leave_out=REDACTED_FILES
                )
            files = digest_files(partial, self.piece_size)
            # Listing first, folder rename last: a folder that exists has its listing (a crash
            # in between leaves a listing without a folder, rebuilt with it next time).
            self._write_listing(name, files)
            try:
                partial.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
                # Another server sharing the home built the same folder first: same content.
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return files

    def _listing_path(self, name: str) -> Path:
        return self.root / f"{name}{LISTING_SUFFIX}"

    def _write_listing(self, name: str, files: list[checkpoints_pb2.ExportedFile]) -> None:
        path = self._listing_path(name)
        partial = path.with_name(f".{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        partial.write_text(_to_json(files), encoding="utf-8")
        partial.replace(path)

    def _read_listing(self, name: str) -> list[checkpoints_pb2.ExportedFile] | None:
        """The stored listing if it still describes the folder's files and sizes (a folder of
        an older server, or one changed by hand, is hashed again)."""
        try:
            records = json.loads(self._listing_path(name).read_text(encoding="utf-8"))
            files = [checkpoints_pb2.ExportedFile(**record) for record in records]
        except (OSError, ValueError, TypeError):
            return None
        folder = self.root / name
        on_disk = {
            p.relative_to(folder).as_posix(): p.stat().st_size
            for p in folder.rglob("*")
            if p.is_file()
        }
        if on_disk != {f.path: f.size for f in files} or any(
            f.piece_size != self.piece_size for f in files
        ):
            return None
        return files
