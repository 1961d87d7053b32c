"""Two processes writing one store at once: no lost version, one CAS winner per race."""

from __future__ import annotations

import torch
from store_helpers import FORK, SMALL_TENSOR, chain_tensor, commit_chain, race_alias, start


def test_two_writers_committing_at_once(store, tiny_llama, tiny_tokenizer):
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="llama")
    count, barrier, results = 6, FORK.Barrier(2), FORK.Queue()
    writers = [start(commit_chain, store.root, base.id, w, count, barrier, results) for w in (1, 2)]
    chains = dict(results.get(timeout=120) for _ in writers)
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert chains[1][count] == chains[2][count]
    assert len(store.list_versions()) == 1 + 2 * count + 1
    for writer, chain in chains.items():
        lineage = [m.id for m in store.lineage(chain[count - 1])]
        assert lineage == [*reversed(chain[:count]), base.id]
        for step, version in enumerate(chain[:count]):
            assert torch.equal(store.tensor(version, SMALL_TENSOR), chain_tensor(writer, step))
    assert store.verify().ok


def test_alias_cas_race_has_exactly_one_winner(store, tiny_llama, tiny_tokenizer):
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="llama")
    versions = [
        store.commit(base.id, {SMALL_TENSOR: torch.full((64,), float(i))}, operations=[]).id
        for i in range(2)
    ]
    rounds: list[tuple[str, str | None]] = [(f"fresh-{i}", None) for i in range(5)]
    for i in range(5):
        store.set_alias(f"moving-{i}", base.id)
        rounds.append((f"moving-{i}", base.id))
    for name, expected in rounds:
        barrier, results = FORK.Barrier(2), FORK.Queue()
        racers = [
            start(race_alias, store.root, name, v, expected, barrier, results) for v in versions
        ]
        outcomes = dict(results.get(timeout=120) for _ in racers)
        for racer in racers:
            racer.join()
        winners = [version for version, won in outcomes.items() if won]
        assert len(winners) == 1, (name, outcomes)
        assert store.get_alias(name) == winners[0]
    assert store.verify().ok
