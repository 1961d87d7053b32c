"""Verified downloads of an exported version over several DownloadVersion streams at once.

The first request asks for the listing only: every file's size, sha256 and the sha256 of each
of its pieces, and the version id the reference resolved to. The files are then fetched as
ranges of whole pieces of that version on concurrent streams. Each chunk is written in place
straight from the received buffer (``os.pwrite`` of a memoryview: no copies) and hashed as it
arrives; each piece is checked as soon as it is complete, and a broken stream resumes at its
first unchecked piece. A server from before ranges answers the listing request with the whole
folder (no version id in its listing): the clients then fall back to one stream
(``DownloadWriter``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from modelsurgery.client.connection import RECONNECT_CODES
from modelsurgery.client.errors import from_rpc_error
from modelsurgery.v1 import checkpoints_pb2

METHOD = "/modelsurgery.v1.CheckpointService/DownloadVersion"
DEFAULT_STREAMS = 4
_DATA_FIELD = checkpoints_pb2.DownloadVersionResponse.DESCRIPTOR.fields_by_name["data"].number
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class DownloadError(OSError):
    """A download that cannot complete as it is: corrupt or unexpected data, a bad listing."""


@dataclass
class Received:
    """One DownloadVersionResponse whose ``data`` is a view into the received message."""

    files: Sequence[checkpoints_pb2.ExportedFile]
    version_id: str
    path: str
    offset: int
    data: memoryview


def _varint(raw: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def decode(raw: bytes) -> Received:
    """Parse a DownloadVersionResponse, leaving its ``data`` in place: the other fields (a few
    bytes, or the listing) are parsed by protobuf; ``data`` is a memoryview of ``raw``, where
    protobuf would copy it twice (parsing, then reading the field)."""
    view = memoryview(raw)
    data = view[:0]
    other: list[memoryview] = []
    position = 0
    while position < len(raw):
        start = position
        key, position = _varint(raw, position)
        wire_type = key & 7
        if wire_type == 0:
            _, position = _varint(raw, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(raw, position)
            if key >> 3 == _DATA_FIELD:
                data = view[position : position + length]
                position += length
                continue
            position += length
        else:
            raise DownloadError(f"malformed download message (wire type {wire_type})")
        other.append(view[start:position])
    message = checkpoints_pb2.DownloadVersionResponse.FromString(b"".join(other))
    return Received(message.files, message.version_id, message.path, message.offset, data)


def encode(request: checkpoints_pb2.DownloadVersionRequest) -> bytes:
    return request.SerializeToString()


@dataclass(frozen=True)
class Segment:
    """A range of whole pieces of one file."""

    path: str
    offset: int
    length: int


def _piece_size(entry: checkpoints_pb2.ExportedFile) -> int:
    return entry.piece_size or max(entry.size, 1)


def _pieces(entry: checkpoints_pb2.ExportedFile) -> list[str]:
    return list(entry.piece_sha256) if entry.piece_size else [entry.sha256]


def split(files: Sequence[checkpoints_pb2.ExportedFile], streams: int) -> list[Segment]:
    """Every non-empty file as segments of whole pieces, a large file cut into about as many
    segments as its share of ``streams`` (piece counts differing by one at most); longest
    first, so that the streams finish together."""
    share = max(1, sum(f.size for f in files) / streams)
    segments = []
    for entry in files:
        step = _piece_size(entry)
        pieces = -(-entry.size // step)
        parts = max(1, min(pieces, round(entry.size / share)))
        start = 0
        for part in range(parts if entry.size else 0):
            end = min(entry.size, start + (pieces // parts + (part < pieces % parts)) * step)
            segments.append(Segment(entry.path, start, end - start))
            start = end
    return sorted(segments, key=lambda s: -s.length)


class _Target:
    """One file being written: its descriptor and which of its pieces have been checked."""

    def __init__(self, path: Path, entry: checkpoints_pb2.ExportedFile) -> None:
        self.entry = entry
        self.digests = _pieces(entry)
        if len(self.digests) != -(-entry.size // _piece_size(entry)):
            raise DownloadError(f"listing of {entry.path!r} has a wrong number of pieces")
        self.checked = [False] * len(self.digests)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, entry.size)


class SegmentWriter:
    """Writes one segment's chunks at their offsets, hashing each piece as its bytes arrive and
    checking it once complete; ``remaining`` is what is left after a break."""

    def __init__(self, target: _Target, segment: Segment) -> None:
        self.target = target
        self.segment = segment
        self.position = segment.offset
        self.end = segment.offset + segment.length
        self._piece_size = _piece_size(target.entry)
        self._piece_start = segment.offset
        self._hasher = hashlib.sha256()

    def write(self, chunk: Received) -> None:
        data = chunk.data
        if chunk.path != self.segment.path or chunk.offset != self.position:
            raise DownloadError(
                f"server sent {chunk.path!r} at {chunk.offset}, expected "
                f"{self.segment.path!r} at {self.position}"
            )
        if self.position + len(data) > self.end:
            raise DownloadError(f"server sent {chunk.path!r} past {self.end}")
        written = 0
        while written < len(data):
            written += os.pwrite(self.target.fd, data[written:], self.position + written)
        while data:
            piece_end = min(self._piece_start + self._piece_size, self.target.entry.size)
            take = min(len(data), piece_end - self.position)
            self._hasher.update(data[:take])
            data = data[take:]
            self.position += take
            if self.position == piece_end:
                self._check_piece()

    def _check_piece(self) -> None:
        index = self._piece_start // self._piece_size
        if self._hasher.hexdigest() != self.target.digests[index]:
            raise DownloadError(
                f"download corrupt: {self.segment.path} sha256 mismatch in piece {index}"
            )
        self.target.checked[index] = True
        self._piece_start = self.position
        self._hasher = hashlib.sha256()

    @property
    def done(self) -> bool:
        return self.position == self.end

    def remaining(self) -> Segment:
        """The part not yet checked, from the start of its first unchecked piece."""
        return Segment(self.segment.path, self._piece_start, self.end - self._piece_start)


class Transfer:
    """One ranged download: the listing, the segments still to fetch (taken by the streams),
    the open files, the retries spent. Thread-safe where streams meet (taking segments,
    putting unfinished ones back, counting progress). A context manager: it closes the files."""

    def __init__(
        self,
        folder: Path,
        ref: str,
        *,
        chunk_size: int,
        streams: int,
        max_retries: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if streams < 1:
            raise ValueError("streams must be >= 1")
        self.folder = folder
        self.ref = ref
        self.chunk_size = chunk_size
        self.streams = streams
        self.max_retries = max_retries
        self.retries = 0
        self.version_id = ""
        self.failed = False
        self._progress = progress
        self._targets: dict[str, _Target] = {}
        self._queue: deque[Segment] = deque()
        self._lock = threading.Lock()

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        for target in self._targets.values():
            os.close(target.fd)
        self._targets.clear()

    def listing_request(self) -> checkpoints_pb2.DownloadVersionRequest:
        return checkpoints_pb2.DownloadVersionRequest(
            ref=self.ref, files_only=True, chunk_size=self.chunk_size
        )

    def _path(self, relative: str) -> Path:
        target = (self.folder / relative).resolve()
        if not target.is_relative_to(self.folder.resolve()):
            raise DownloadError(f"server sent a path outside the download folder: {relative!r}")
        return target

    def start(self, listing: Received) -> None:
        """Open (and size) every listed file and queue its segments."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.version_id = listing.version_id
        for entry in listing.files:
            if entry.path in self._targets:
                raise DownloadError(f"listing names {entry.path!r} twice")
            if entry.size == 0 and entry.sha256 != _EMPTY_SHA256:
                raise DownloadError(f"download corrupt: {entry.path} sha256 mismatch")
            self._targets[entry.path] = _Target(self._path(entry.path), entry)
        self._queue.extend(split(listing.files, self.streams))

    def take(self) -> SegmentWriter | None:
        """The next segment for a stream, or None when none is left (or the download failed)."""
        with self._lock:
            if self.failed or not self._queue:
                return None
            segment = self._queue.popleft()
        return SegmentWriter(self._targets[segment.path], segment)

    def request(self, writer: SegmentWriter) -> checkpoints_pb2.DownloadVersionRequest:
        segment = writer.segment
        return checkpoints_pb2.DownloadVersionRequest(
            ref=self.version_id,
            start_path=segment.path,
            offset=segment.offset,
            length=segment.length,
            chunk_size=self.chunk_size,
        )

    def write(self, writer: SegmentWriter, chunk: Received) -> None:
        writer.write(chunk)
        if self._progress is not None:
            with self._lock:
                self._progress(len(chunk.data))

    def retry(self, error: grpc.RpcError, writer: SegmentWriter | None = None) -> float:
        """After a broken stream: the seconds to wait before trying again (an interrupted
        segment's unchecked part is queued again), or the error to raise when it is not a
        disconnect or no retry is left."""
        with self._lock:
            if error.code() not in RECONNECT_CODES or self.failed:
                raise from_rpc_error(error) from None
            if self.retries >= self.max_retries:
                raise from_rpc_error(error) from None
            self.retries += 1
            if writer is not None:
                self._queue.appendleft(writer.remaining())
            return 0.5 * self.retries

    def fail(self) -> None:
        """Stop handing out segments: one stream failed for good."""
        with self._lock:
            self.failed = True

    def verify(self) -> Path:
        """Every piece of every file has been checked."""
        for path, target in self._targets.items():
            if not all(target.checked):
                raise DownloadError(f"download incomplete: {path}")
        return self.folder


Metadata = tuple[tuple[str, str], ...]


def _listing(first: Received | None) -> Received | None:
    if first is None:
        raise DownloadError("server sent no listing")
    return first if first.version_id else None


def fetch_listing(
    call: grpc.UnaryStreamMultiCallable, transfer: Transfer, metadata: Metadata
) -> Received | None:
    """The listing, or None from a server without ranges (it goes on to send the whole
    folder; that stream is cancelled)."""
    while True:
        stream = call(transfer.listing_request(), metadata=metadata)
        try:
            first = next(stream, None)
            stream.cancel()
            return _listing(first)
        except grpc.RpcError as error:
            time.sleep(transfer.retry(error))


def _stream_segments(
    call: grpc.UnaryStreamMultiCallable, transfer: Transfer, metadata: Metadata
) -> None:
    try:
        while (writer := transfer.take()) is not None:
            stream = call(transfer.request(writer), metadata=metadata)
            try:
                for chunk in stream:
                    if transfer.failed:
                        stream.cancel()
                        return
                    if chunk.data:
                        transfer.write(writer, chunk)
            except grpc.RpcError as error:
                time.sleep(transfer.retry(error, writer))
                continue
            if not writer.done:
                raise DownloadError(f"stream ended before {writer.segment.path} was complete")
    except BaseException:
        transfer.fail()
        raise


def fetch_segments(
    call: grpc.UnaryStreamMultiCallable, transfer: Transfer, metadata: Metadata
) -> None:
    """Every segment, on ``transfer.streams`` threads (receiving, hashing and writing all
    release the GIL); the first failure (or an interrupt) stops the others and is raised."""
    pool = ThreadPoolExecutor(transfer.streams, thread_name_prefix="download")
    try:
        futures = [
            pool.submit(_stream_segments, call, transfer, metadata) for _ in range(transfer.streams)
        ]
        for future in futures:
            future.result()
    except BaseException:
        transfer.fail()
        raise
    finally:
        pool.shutdown()


async def fetch_listing_async(
    call: grpc.aio.UnaryStreamMultiCallable, transfer: Transfer, metadata: Metadata
) -> Received | None:
    """As ``fetch_listing``, for the asyncio client."""
    while True:
        stream = call(transfer.listing_request(), metadata=metadata)
        try:
            first = await stream.read()
            stream.cancel()
            return _listing(None if first is grpc.aio.EOF else first)
        except grpc.RpcError as error:
            await asyncio.sleep(transfer.retry(error))


async def _stream_segments_async(
    call: grpc.aio.UnaryStreamMultiCallable, transfer: Transfer, metadata: Metadata
) -> None:
    try:
        while (writer := transfer.take()) is not None:
            stream = call(transfer.request(writer), metadata=metadata)
            try:
                async for chunk in stream:
                    if chunk.data:
                        await asyncio.to_thread(transfer.write, writer, chunk)
            except grpc.RpcError as error:
                await asyncio.sleep(transfer.retry(error, writer))
                continue
            if not writer.done:
                raise DownloadError(f"stream ended before {writer.segment.path} was complete")
    except BaseException:
        transfer.fail()
        raise


async def fetch_segments_async(
    call: grpc.aio.UnaryStreamMultiCallable, transfer: Transfer, metadata: Metadata
) -> None:
    """Every segment, on ``transfer.streams`` tasks (hashing and writing in threads); the
    first failure cancels the others and is raised."""
    tasks = [
        asyncio.create_task(_stream_segments_async(call, transfer, metadata))
        for _ in range(transfer.streams)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
