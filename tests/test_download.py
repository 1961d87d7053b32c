"""DownloadVersion and the SDK's ranged downloads against the real CheckpointService on a
loopback port: digests computed once when the export is built and kept beside it, ranges of
whole pieces fetched on parallel streams and checked as they complete, resumption after a
broken stream, corruption caught, and both older protocols (an old client, an old server)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import AsyncClient, Client, InvalidArgument
from modelsurgery.client.connection import DownloadWriter
from modelsurgery.client.download import DownloadError, Segment, decode, split
from modelsurgery.server import exports as exports_module
from modelsurgery.server.checkpoint_service import CheckpointService
from modelsurgery.server.exports import LISTING_SUFFIX, ExportCache, digest_files
from modelsurgery.v1 import checkpoints_pb2 as pb
from modelsurgery.v1 import checkpoints_pb2_grpc

PIECE = 16 << 10
CHUNK = 5000


def entry(path: str, size: int, piece: int = PIECE) -> pb.ExportedFile:
    count = -(-size // piece)
    return pb.ExportedFile(path=path, size=size, piece_size=piece, piece_sha256=["x"] * count)


class BreakingService(CheckpointService):
    """Breaks the first ranged stream (UNAVAILABLE) after two chunks; records every request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[pb.DownloadVersionRequest] = []
        self.broken = False

    async def DownloadVersion(
        self, request: pb.DownloadVersionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadVersionResponse]:
        self.requests.append(request)
        sent = 0
        async for message in super().DownloadVersion(request, context):
            yield message
            sent += bool(message.data)
            if request.length and sent == 2 and not self.broken:
                self.broken = True
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")


class OldService(CheckpointService):
    """The protocol before ranges: no version id, files_only and length ignored."""

    async def DownloadVersion(
        self, request: pb.DownloadVersionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadVersionResponse]:
        old = pb.DownloadVersionRequest(
            ref=request.ref,
            start_path=request.start_path,
            offset=request.offset,
            chunk_size=request.chunk_size,
        )
        async for message in super().DownloadVersion(old, context):
            message.ClearField("version_id")
            yield message


class Server:
    """A CheckpointService class on a loopback port, run on its own event loop thread."""

    def __init__(self, service: CheckpointService) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, port = self.run(self._start())
        self.address = f"127.0.0.1:{port}"

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 4 << 20)])
        checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(self.service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def stop(self) -> None:
        self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@pytest.fixture
def version(store: CheckpointStore, tiny_llama, tiny_tokenizer) -> str:
    return store.import_model(tiny_llama, tiny_tokenizer, reference="tiny").id


@pytest.fixture
def exports(store: CheckpointStore, tmp_path: Path) -> ExportCache:
    (tmp_path / "exports").mkdir()
    return ExportCache(tmp_path / "exports", store, piece_size=PIECE)


def serve(kind: type[CheckpointService], store: CheckpointStore, exports: ExportCache) -> Server:
    return Server(kind(store, None, exports, model_roots=None))  # type: ignore[arg-type]


@pytest.fixture
def server(store: CheckpointStore, exports: ExportCache) -> Iterator[Server]:
    running = serve(BreakingService, store, exports)
    running.service.broken = True  # breaks nothing unless a test arms it
    yield running
    running.stop()


def same_files(a: Path, b: Path) -> bool:
    def files(folder: Path) -> dict[str, bytes]:
        return {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*")
            if p.is_file()
        }

    return files(a) == files(b)


# --- pieces, codec, plan -----------------------------------------------------------------
def test_digests_cover_each_piece_and_the_whole_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 300  # 76,800 bytes: four full pieces and a short one
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "small.json").write_bytes(b"{}")
    (tmp_path / "empty").write_bytes(b"")
    listing = {f.path: f for f in digest_files(tmp_path, PIECE)}
    big = listing["big.bin"]
    assert big.sha256 == hashlib.sha256(data).hexdigest()
    assert list(big.piece_sha256) == [
        hashlib.sha256(data[i : i + PIECE]).hexdigest() for i in range(0, len(data), PIECE)
    ]
    assert list(listing["small.json"].piece_sha256) == [listing["small.json"].sha256]
    assert listing["empty"].size == 0 and not listing["empty"].piece_sha256


def test_decode_leaves_data_in_the_received_buffer() -> None:
    chunk = pb.DownloadVersionResponse(path="model.safetensors", offset=7, data=b"\x00abc" * 9)
    raw = chunk.SerializeToString()
    received = decode(raw)
    assert (received.path, received.offset, bytes(received.data)) == (
        "model.safetensors",
        7,
        b"\x00abc" * 9,
    )
    assert received.data.obj is raw
    listing = pb.DownloadVersionResponse(files=[entry("a", 3)], version_id="v1")
    received = decode(listing.SerializeToString())
    assert list(received.files) == list(listing.files) and received.version_id == "v1"
    assert not received.data


def test_split_shares_large_files_in_whole_pieces() -> None:
    files = [entry("big", 10 * PIECE + 5), entry("config.json", 300), entry("empty", 0)]
    segments = split(files, streams=4)
    assert Segment("config.json", 0, 300) in segments
    big = sorted((s for s in segments if s.path == "big"), key=lambda s: s.offset)
    assert all(s.offset % PIECE == 0 for s in big)
    assert [s.offset + s.length for s in big][:-1] == [s.offset for s in big][1:]
    assert big[-1].offset + big[-1].length == 10 * PIECE + 5
    assert len(big) == 4
    assert [s.length for s in segments] == sorted((s.length for s in segments), reverse=True)
    assert split(files, streams=1)[0] == Segment("big", 0, 10 * PIECE + 5)


# --- the export cache ----------------------------------------------------------------------
def test_listing_is_kept_beside_the_export_and_reused_after_a_restart(
    store: CheckpointStore, exports: ExportCache, version: str, monkeypatch
) -> None:
    files = exports.listing(version)
    kept = exports.root / f"{version}{LISTING_SUFFIX}"
    assert kept.is_file()
    assert {f.path for f in files} == {
        p.relative_to(exports.root / version).as_posix()
        for p in (exports.root / version).rglob("*")
        if p.is_file()
    }

    def no_hashing(*args: object) -> None:
        raise AssertionError("hashed again")

    monkeypatch.setattr(exports_module, "digest_files", no_hashing)
    restarted = ExportCache(exports.root, store, piece_size=PIECE)
    assert restarted.listing(version) == files
    monkeypatch.undo()

    # A folder whose files no longer match the kept listing is hashed again.
    config = exports.root / version / "config.json"
    config.write_bytes(config.read_bytes() + b"\n")
    again = ExportCache(exports.root, store, piece_size=PIECE).listing(version)
    assert {f.path: f.size for f in again}["config.json"] == config.stat().st_size


# --- downloads -----------------------------------------------------------------------------
def test_parallel_download_matches_the_export(
    server: Server, exports: ExportCache, version: str, tmp_path: Path
) -> None:
    seen: list[int] = []
    with Client(server.address, timeout=60) as client:
        folder = client.download(
            version, tmp_path / "sync", chunk_size=CHUNK, streams=3, progress=seen.append
        )
    export = exports.root / version
    assert same_files(folder, export)
    assert sum(seen) == sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    ranged = [r for r in server.service.requests if r.length]
    assert {r.ref for r in ranged} == {version}  # ranges of the version the listing named
    assert all(r.offset % PIECE == 0 for r in ranged)

    async def download() -> Path:
        async with AsyncClient(server.address, timeout=60) as client:
            return await client.download(version, tmp_path / "async", streams=2)

    assert same_files(asyncio.run(download()), export)


def test_broken_stream_resumes_at_its_first_unchecked_piece(
    server: Server, exports: ExportCache, version: str, tmp_path: Path
) -> None:
    server.service.broken = False
    with Client(server.address, timeout=60) as client:
        folder = client.download(version, tmp_path / "resumed", chunk_size=CHUNK, streams=1)
    assert same_files(folder, exports.root / version)
    first, resumed = [r for r in server.service.requests if r.length][:2]
    # Two chunks (10,000 bytes) arrived; none of the 16 KiB first piece was checked yet.
    assert (resumed.start_path, resumed.offset) == (first.start_path, first.offset)
    assert resumed.length == first.length


def test_corrupt_piece_is_refused(
    server: Server, exports: ExportCache, version: str, tmp_path: Path
) -> None:
    exports.listing(version)
    weights = exports.root / version / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[PIECE + 10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with Client(server.address, timeout=60) as client, pytest.raises(DownloadError) as error:
        client.download(version, tmp_path / "corrupt", streams=2)
    assert "model.safetensors sha256 mismatch in piece 1" in str(error.value)


def test_range_requests_are_checked(server: Server, exports: ExportCache, version: str) -> None:
    size = {f.path: f.size for f in exports.listing(version)}["config.json"]
    with grpc.insecure_channel(server.address) as channel:
        stub = checkpoints_pb2_grpc.CheckpointServiceStub(channel)

        def call(**fields: Any) -> list[pb.DownloadVersionResponse]:
            return list(stub.DownloadVersion(pb.DownloadVersionRequest(ref=version, **fields)))

        (listing,) = call(files_only=True)
        assert listing.version_id == version and listing.files
        messages = call(start_path="config.json", offset=2, length=size - 2, chunk_size=7)
        assert (
            b"".join(m.data for m in messages[1:])
            == (exports.root / version / "config.json").read_bytes()[2:]
        )
        assert {m.path for m in messages[1:]} == {"config.json"}
        for fields, code in [
            ({"start_path": "config.json", "offset": 1, "length": size}, "OUT_OF_RANGE"),
            ({"length": 10}, "INVALID_ARGUMENT"),
            ({"start_path": "config.json", "length": -1}, "INVALID_ARGUMENT"),
        ]:
            with pytest.raises(grpc.RpcError) as error:
                call(**fields)
            assert error.value.code().name == code, fields


def test_an_old_client_still_gets_the_whole_folder(
    server: Server, exports: ExportCache, version: str, tmp_path: Path
) -> None:
    writer = DownloadWriter(tmp_path / "old-client")
    writer.folder.mkdir()
    with grpc.insecure_channel(server.address) as channel:
        stub = checkpoints_pb2_grpc.CheckpointServiceStub(channel)
        for message in stub.DownloadVersion(writer.request(version, 1 << 20)):
            writer.write(message)
    assert same_files(writer.verify(), exports.root / version)


def test_a_new_client_falls_back_to_one_stream_on_an_old_server(
    store: CheckpointStore, exports: ExportCache, version: str, tmp_path: Path
) -> None:
    old = serve(OldService, store, exports)
    try:
        with Client(old.address, timeout=60) as client:
            folder = client.download(version, tmp_path / "fallback", chunk_size=CHUNK)
    finally:
        old.stop()
    assert same_files(folder, exports.root / version)


def test_unknown_version_is_not_found_and_bad_streams_refused(
    server: Server, version: str, tmp_path: Path
) -> None:
    with Client(server.address, timeout=60) as client:
        with pytest.raises(InvalidArgument) as error:
            client.download(version, tmp_path / "x", chunk_size=4 << 20)
        assert error.value.field == "chunk_size"
        with pytest.raises(ValueError, match="streams"):
            client.download(version, tmp_path / "y", streams=0)
