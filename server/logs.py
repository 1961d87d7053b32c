"""Structured logs: one JSON object per line on stderr, whatever wrote the line.

Python logging from every library (modelsurgery, ray, grpc, warnings) goes through one root
handler with python-json-logger's formatter. Native code writes to file descriptors 1 and 2
directly: gRPC's C core (absl format), Ray's C++ core (spdlog format). ``relay_output`` points
both descriptors at a pipe read by a small relay process that passes JSON lines through and
turns every other line into a JSON record. A separate process, not a thread, so that what a
crashing server wrote last (a fatal check in native code) still reaches the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter as LibraryJsonFormatter

# Loggers that configure themselves on import (a handler of their own, propagate off).
THIRD_PARTY = ("ray", "grpc")
NATIVE_LOGGER = {"absl": "grpc.core", "ray": "ray.core"}
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_SPDLOG = re.compile(r"^\[[\d\- :,]+ ([DIWEC]) \d+ \d+\] ([^\s:]+:\d+): ?(.*)$")
_LEVELS = {
    "D": logging.DEBUG,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
    "C": logging.CRITICAL,
}
RELAY_WAIT_S = 10
# A progress bar's frame (tqdm: "Loading weights:  40%|####      | 2/5 [00:01<00:02]"): meant
# for a terminal, noise in a JSON log.
_PROGRESS_BAR = re.compile(r"\d+%\|[^|]*\|")
# Environment switches that turn the libraries' progress bars off (tqdm reads TQDM_* itself);
# set in the server before Ray starts, so its workers inherit them.
QUIET_PROGRESS_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
JOBS_LOGGER = "modelsurgery.jobs"


class JsonFormatter(LibraryJsonFormatter):
    """``time`` (UTC, ms), ``level``, ``logger``, ``message``, then the record's extra fields;
    ``exception`` holds a traceback."""

    def __init__(self) -> None:
        super().__init__("{message}", style="{", rename_fields={"exc_info": "exception"})

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        created = datetime.fromtimestamp(record.created, UTC)
        log_data["time"] = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        log_data["level"] = record.levelname.lower()
        log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)


def configure_logging(json_logs: bool = True, level: int = logging.INFO) -> None:
    """One stderr handler on the root logger; ray's and grpc's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_logs else logging.Formatter("%(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    ours = logging.getLogger("modelsurgery")
    ours.handlers.clear()
    ours.setLevel(level)
    ours.propagate = True
    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """No progress bars in a server or worker process: transformers, datasets and the Hub
    draw them with tqdm on stderr, which the relay would turn into one record per frame."""
    for name, value in QUIET_PROGRESS_ENV.items():
        os.environ.setdefault(name, value)
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()


def is_progress_bar(line: str) -> bool:
    """A line a progress bar drew (carriage-return frames, tqdm's ``NN%|...|``)."""
    return "\r" in line or bool(_PROGRESS_BAR.search(line))


def log_job_submitted(job_id: str, caller: str, base: str, methods: list[str]) -> None:
    logging.getLogger(JOBS_LOGGER).info(
        "job submitted",
        extra={"job_id": job_id, "caller": caller, "base": base, "methods": methods},
    )


def log_job_started(job_id: str, attempt: int, base_version: str) -> None:
    logging.getLogger(JOBS_LOGGER).info(
        "job started", extra={"job_id": job_id, "attempt": attempt, "base_version": base_version}
    )


def log_job_finished(job_id: str, state: str, error: str, version_id: str | None) -> None:
    """SUCCEEDED and CANCELLED at INFO; FAILED at WARNING with its reason (a job's failure is
    the caller's to act on, not the server's error, which is logged where it happens)."""
    failed = state == "FAILED"
    logging.getLogger(JOBS_LOGGER).log(
        logging.WARNING if failed else logging.INFO,
        f"job failed: {error}" if failed else f"job {state.lower()}",
        extra={"job_id": job_id, "state": state, "error": error, "version_id": version_id or ""},
    )


def native_record(line: str) -> tuple[str, int, str, dict[str, str]]:
    """(logger, level, message, extra) for a line that native code wrote to stdout/stderr."""
    for kind, pattern in (("absl", _ABSL), ("ray", _SPDLOG)):
        match = pattern.match(line)
        if match:
            code, source, message = match.groups()
            return NATIVE_LOGGER[kind], _LEVELS[code], message, {"source": source}
    return "stdio", logging.WARNING, line, {}


def native_threshold(environ: Mapping[str, str]) -> int:
    """gRPC's C core logs INFO until absl is initialised, whatever GRPC_VERBOSITY says later in
    the process; those lines are dropped unless GRPC_VERBOSITY or GRPC_TRACE asks for them."""
    verbose = environ.get("GRPC_VERBOSITY") or environ.get("GRPC_TRACE")
    return logging.DEBUG if verbose else logging.WARNING


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _relay() -> None:
    """Relay process: stdin lines to JSON lines on stderr, until every writer has closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(json_logs=True)
    logging.getLogger("grpc.core").setLevel(native_threshold(os.environ))
    out = sys.stderr
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.strip():
            continue
        if is_progress_bar(line):
            continue
        if _is_json_object(line):
            out.write(line + "\n")
            out.flush()
            continue
        name, level, message, extra = native_record(line)
        logging.getLogger(name).log(level, message, extra=extra)


@contextlib.contextmanager
def relay_output() -> Iterator[None]:
    """While open, file descriptors 1 and 2 of this process feed the JSON relay."""
    sys.stdout.flush()
    sys.stderr.flush()
    relay = subprocess.Popen(
        [sys.executable, "-m", "modelsurgery.server.logs"],
        stdin=subprocess.PIPE,
        stdout=sys.stderr.fileno(),
    )
    assert relay.stdin is not None
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        for fd in saved:
            os.dup2(relay.stdin.fileno(), fd)
        relay.stdin.close()
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        with contextlib.suppress(subprocess.TimeoutExpired):
            relay.wait(timeout=RELAY_WAIT_S)


if __name__ == "__main__":
    _relay()
