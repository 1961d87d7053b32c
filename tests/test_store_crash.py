"""Crash safety: a writer killed at any moment leaves the store whole (old state or new)."""

from __future__ import annotations

import os
import random
import signal
import time

from store_helpers import BIG_TENSOR, FORK, commit_forever, die_writing_manifest, start

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.models.digest import tensor_sha256


def assert_store_whole(root) -> CheckpointStore:
    """Reopen (gc drops dead writers' temp files), verify, and resolve every version fully."""
    store = CheckpointStore(root)
    assert list(store.layout.tmp.iterdir()) == []
    report = store.verify()
    assert report.ok, report.problems
    for manifest in store.list_versions():
        state = store.state_dict(manifest.id)
        entries = store.tensor_entries(manifest.id)
        assert {n: tensor_sha256(t) for n, t in state.items()} == {
            n: e.blob for n, e in entries.items()
        }
    return store


def test_sigkill_during_commits_never_leaves_a_half_version(store, tiny_llama, tiny_tokenizer):
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="llama")
    rng = random.Random(1234)
    for round_ in range(6):
        first_done = FORK.Event()
        writer = start(commit_forever, store.root, round_, first_done)
        assert first_done.wait(timeout=120)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
    reopened = assert_store_whole(store.root)
    versions = reopened.list_versions()
    assert len(versions) >= 7 and versions[-1].id == base.id
    assert all(BIG_TENSOR in m.tensors for m in versions[:-1])


def test_writer_dying_inside_the_manifest_write(store, tiny_llama, tiny_tokenizer):
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="llama")
    writer = start(die_writing_manifest, store.root, base.id)
    writer.join()
    assert writer.exitcode == 137
    assert len(list(store.layout.tmp.iterdir())) == 1
    assert [m.id for m in store.list_versions()] == [base.id]
    reopened = assert_store_whole(store.root)
    assert [m.id for m in reopened.list_versions()] == [base.id]
