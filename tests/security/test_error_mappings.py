"""Errors the caller can act on (issue 29): a request that does not decode, a corrupt or pickled
weights file, a chat template the sandbox refuses, a full disk, an unknown ``~user``, a
transformers message about a model folder and an over-long ImportModel reference each get a
status that says whose fault it is and a message without server paths, never a bare INTERNAL or
UNKNOWN."""

from __future__ import annotations

import asyncio
import errno
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jinja2.exceptions
import pytest
from ray.exceptions import RayTaskError
from safetensors import SafetensorError
from service_under_test import Running, running_service

from modelsurgery.client import InvalidArgument
from modelsurgery.models import ModelReferenceError, load, resolve_reference
from modelsurgery.proto.limits import MAX_REFERENCE_CHARS
from modelsurgery.server.app import ServerSettings
from modelsurgery.server.auth import BearerTokenInterceptor, Caller, Role
from modelsurgery.server.failures import FailureInterceptor
from modelsurgery.v1 import jobs_pb2

SERVICE = "modelsurgery.test.Mappings"
NOT_A_MESSAGE = b"\xff\xff\xff"


def _from_worker(cause: Exception) -> Exception:
    """The exception ``await actor.method.remote()`` raises for ``cause`` in the worker."""
    return RayTaskError(
        "SurgeryWorker.generate", "Traceback ...", cause, pid=4242, ip="10.1.2.3"
    ).as_instanceof_cause()


def _raising(exc: Exception) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> bytes:
        raise exc

    return handler


async def _echo(request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> bytes:
    return request.job_id.encode()


async def _count(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
    return str(len([r async for r in requests])).encode()


def _settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(store_root=tmp_path / "home" / "store")


def _call(
    settings: ServerSettings,
    method: str,
    request: bytes = b"",
    *,
    tokens: dict[str, Caller] | None = None,
) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` of a real grpc.aio server with the server's interceptors, on loopback;
    raw bytes go out as they are."""
    decode = jobs_pb2.GetJobRequest.FromString
    disk_full = OSError(errno.ENOSPC, "No space left on device", f"{settings.store_root}/x")
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo, request_deserializer=decode),
        "Count": grpc.stream_unary_rpc_method_handler(_count, request_deserializer=decode),
        "DiskFull": grpc.unary_unary_rpc_method_handler(_raising(disk_full)),
        "WorkerDiskFull": grpc.unary_unary_rpc_method_handler(_raising(_from_worker(disk_full))),
        "Corrupt": grpc.unary_unary_rpc_method_handler(
            _raising(_from_worker(SafetensorError("Error while deserializing header")))
        ),
        "Sandbox": grpc.unary_unary_rpc_method_handler(
            _raising(_from_worker(jinja2.exceptions.SecurityError("access to 'mro' is unsafe")))
        ),
        "Template": grpc.unary_unary_rpc_method_handler(
            _raising(_from_worker(jinja2.exceptions.TemplateError("roles must alternate")))
        ),
    }

    async def scenario() -> tuple[grpc.StatusCode, str]:
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tokens:
            interceptors.append(BearerTokenInterceptor(tokens))
        interceptors.append(FailureInterceptor(settings))
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                path = f"/{SERVICE}/{method}"
                if method == "Count":
                    await channel.stream_unary(path)(iter([b"", request]))
                else:
                    await channel.unary_unary(path)(request)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        finally:
            await server.stop(None)
        raise AssertionError(f"{method} succeeded")

    return asyncio.run(scenario())


@pytest.mark.parametrize("method", ["Echo", "Count"])
def test_a_request_that_does_not_decode_is_invalid_argument(tmp_path: Path, method: str) -> None:
    code, message = _call(_settings(tmp_path), method, NOT_A_MESSAGE)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert "modelsurgery.v1.GetJobRequest" in message, message


def test_an_undecodable_request_without_a_token_is_unauthenticated(tmp_path: Path) -> None:
    tokens = {"secret-token": Caller("alice", Role.ADMIN)}
    code, _ = _call(_settings(tmp_path), "Echo", NOT_A_MESSAGE, tokens=tokens)
    assert code is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("method", "code", "says"),
    [
        ("DiskFull", grpc.StatusCode.RESOURCE_EXHAUSTED, "out of disk space"),
        ("WorkerDiskFull", grpc.StatusCode.RESOURCE_EXHAUSTED, "out of disk space"),
        ("Corrupt", grpc.StatusCode.FAILED_PRECONDITION, "a weights file is corrupt"),
        ("Sandbox", grpc.StatusCode.FAILED_PRECONDITION, "without the chat template"),
        ("Template", grpc.StatusCode.INVALID_ARGUMENT, "roles must alternate"),
    ],
)
def test_known_failures_get_their_status(
    tmp_path: Path, method: str, code: grpc.StatusCode, says: str
) -> None:
    answered, message = _call(_settings(tmp_path), method)
    assert answered is code, (answered, message)
    assert says in message, message
    assert str(tmp_path) not in message and "4242" not in message


@pytest.fixture
def models(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Path:
    root = tmp_path / "models"
    tiny_llama.save_pretrained(root / "good")
    tiny_tokenizer.save_pretrained(root / "good")
    return root


class _Shell:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("true",))


def test_a_corrupt_safetensors_folder_names_the_reference(models: Path) -> None:
    folder = models / "corrupt"
    shutil.copytree(models / "good", folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelReferenceError) as raised:
        load(str(folder), allowed_roots=[models])
    message = str(raised.value)
    assert message.startswith(f"model reference {str(folder)!r} does not load: Safetensor")


def test_a_refused_pickle_says_to_convert_to_safetensors(models: Path) -> None:
    folder = models / "pickled"
    shutil.copytree(models / "good", folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Shell(), protocol=2))
    with pytest.raises(ModelReferenceError) as raised:
        load(str(folder), allowed_roots=[models])
    message = str(raised.value)
    assert message.startswith(f"model reference {str(folder)!r} does not load"), message
    assert "safetensors" in message and "weights_only" not in message, message


@pytest.fixture
def server(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Iterator[Running]:
    with running_service(tmp_path / "home", tiny_llama, tiny_tokenizer) as running:
        yield running


def test_unknown_and_known_users_read_alike(server: Running, tmp_path: Path) -> None:
    answers = set()
    with server.client() as client:
        for reference in ("~nosuchuser-29/model", "~root/model"):
            spec = {"base": reference, "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}
            with pytest.raises(InvalidArgument) as submitted:
                client.submit(spec)
            with pytest.raises(InvalidArgument) as imported:
                client.import_model(reference)
            for error in (submitted.value, imported.value):
                answers.add(error.message.replace(repr(reference), "REF"))
    assert answers == {"model reference REF is outside the server's model roots"}


def test_an_unknown_user_without_roots_is_unresolvable() -> None:
    with pytest.raises(ModelReferenceError, match="names no user"):
        resolve_reference("~nosuchuser-29/model")


def test_submit_scrubs_server_paths_from_transformers_messages(
    server: Running, tmp_path: Path
) -> None:
    broken = server.model.parent / "broken"
    shutil.copytree(server.model, broken)
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    spec = {"base": str(broken), "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}
    with server.client() as client, pytest.raises(InvalidArgument) as raised:
        client.submit(spec)
    message = raised.value.message
    assert message.startswith(f"model reference {str(broken)!r} does not load: "), message
    problem = message.partition(" does not load: ")[2]
    assert "<model-root>/broken/config.json" in problem and "not a valid JSON" in problem
    assert str(tmp_path) not in problem, problem


def test_import_model_caps_the_reference(server: Running) -> None:
    reference = "m" * (MAX_REFERENCE_CHARS + 1)
    with server.client() as client, pytest.raises(InvalidArgument) as raised:
        client.import_model(reference)
    assert raised.value.message == f"at most {MAX_REFERENCE_CHARS} characters"
    with server.client() as client, pytest.raises(InvalidArgument) as raised:
        client.import_model("m" * 100_000)
    assert raised.value.message == f"at most {MAX_REFERENCE_CHARS} characters"
