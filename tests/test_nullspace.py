"""Null-space projected edits (AlphaEdit) and the preserved keys a lineage carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_editable, build_tiny_tokenizer, run_job
from test_memit import FACTS, last_layer_outputs, site_targets
from test_rome import FACT, QUICK, context, target_logp
from test_rome import data_dir as data_dir
from transformers import AutoModelForCausalLM

from modelsurgery.editing import memit, rome
from modelsurgery.editing.knowledge.nullspace import (
    eigen_path,
    eigendecomposition,
    null_space,
    projected_rank_one,
    projected_update,
)
from modelsurgery.editing.knowledge.preserved import PRESERVED_KEYS_ARTIFACT, PreservedKeys
from modelsurgery.editing.knowledge.stats import LayerStatistics, StatsSettings
from modelsurgery.editing.registry import get_method
from modelsurgery.models.adapters import get_adapter

WIDTH, PRESERVED_RANK = 12, 5


def statistics(tmp_path: Path, seed: int = 0) -> tuple[LayerStatistics, torch.Tensor]:
    """C with PRESERVED_RANK large eigenvalues (the preserved keys' span, returned as columns)
    and the rest tiny (below 10x the median), as a real layer's keys give (less cleanly)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator, dtype=torch.float64))
    values = torch.linspace(1e-4, 2e-4, WIDTH, dtype=torch.float64)
    values[:PRESERVED_RANK] = torch.linspace(1.0, 3.0, PRESERVED_RANK, dtype=torch.float64)
    mom2 = basis @ torch.diag(values) @ basis.T
    path = tmp_path / "mom2" / "digest" / "layer.safetensors"
    path.parent.mkdir(parents=True)
    stats = LayerStatistics(0, mom2, "digest", StatsSettings(), path)
    return stats, basis[:, :PRESERVED_RANK]


def test_projected_update_leaves_preserved_keys_unchanged(tmp_path: Path) -> None:
    stats, kept = statistics(tmp_path)
    space = null_space(stats, threshold=10.0)
    assert space.rank == WIDTH - PRESERVED_RANK
    with pytest.raises(ValueError, match=r"^nullspace_threshold: no direction of layer 0"):
        null_space(stats, threshold=0.1)
    keys, residuals = torch.randn(3, WIDTH), torch.randn(3, 7)
    update = projected_update(keys, residuals, space, None, ridge=1e-3, mom2_weight=0.5)
    # Any key in the preserved span (here: 20 random ones) maps to exactly what it did.
    preserved = kept @ torch.randn(PRESERVED_RANK, 20, dtype=torch.float64)
    assert (update @ preserved).norm() < 1e-10 * update.norm() * preserved.norm()
    # The normal equations of the projected objective hold: for D = X U^T, d/dX of
    # ||X U^T K^T - R^T||^2 + ridge * scale * ||X||^2 + mom2_weight * tr(X U^T C U X^T)
    # vanishes (U^T C U = diag of the kept eigenvalues).
    u, k, r = space.basis, keys.double(), residuals.double()
    x = update @ u
    torch.testing.assert_close(u.T @ stats.mom2 @ u, torch.diag(space.values))
    penalty = torch.diag(1e-3 * space.scale + 0.5 * space.values)
    gradient = (x @ u.T @ k.T - r.T) @ k @ u + x @ penalty
    assert gradient.abs().max() < 1e-9


def test_projected_update_keeps_earlier_edits(tmp_path: Path) -> None:
    """Earlier edits' keys (in the null space, where the projection alone would not spare them)
    keep their outputs when their Gram matrix enters the system."""
    stats, _ = statistics(tmp_path)
    space = null_space(stats, threshold=10.0)
    earlier = space.basis @ torch.randn(space.rank, 2, dtype=torch.float64)  # [in, 2]
    keys, residuals = torch.randn(2, WIDTH), torch.randn(2, 7)
    free = projected_update(keys, residuals, space, None, ridge=1e-3)
    kept = projected_update(keys, residuals, space, earlier @ earlier.T, ridge=1e-3)
    assert (kept @ earlier).norm() < 0.01 * (free @ earlier).norm()


def test_projected_rank_one_maps_the_key_and_spares_the_rest(tmp_path: Path) -> None:
    stats, kept = statistics(tmp_path)
    space = null_space(stats, threshold=10.0)
    key, delta = torch.randn(WIDTH), torch.randn(7)
    earlier = space.basis @ torch.randn(space.rank, 1, dtype=torch.float64)
    update = projected_rank_one(key, delta, space, earlier @ earlier.T, ridge=1e-6)
    torch.testing.assert_close(update @ key.double(), delta.double())
    assert torch.linalg.matrix_rank(update) == 1
    assert (update @ kept).norm() < 1e-10 * update.norm()
    assert (update @ earlier).norm() < 1e-4 * (update @ key.double()).norm()
    with pytest.raises(ValueError, match=r"^nullspace_threshold: "):
        projected_rank_one(kept[:, 0].float(), delta, space, None, ridge=1.0)


def test_eigendecomposition_is_cached_beside_the_statistics(tmp_path: Path) -> None:
    stats, _ = statistics(tmp_path)
    values, vectors = eigendecomposition(stats)
    assert eigen_path(stats).parent == stats.path.parent and eigen_path(stats).exists()
    again = LayerStatistics(0, torch.zeros(WIDTH, WIDTH), "digest", StatsSettings(), stats.path)
    torch.testing.assert_close(eigendecomposition(again), (values, vectors))  # from the file


def test_preserved_keys_round_trip_and_switch_to_gram() -> None:
    keys = torch.randn(10, 4, dtype=torch.float64)
    found = PreservedKeys.from_bytes(None)
    assert found.gram("a", 4) is None
    found.add("a", keys[:3])
    found.add("b", keys[:1])
    assert PreservedKeys.from_bytes(found.to_bytes()).count("a") == 3
    found.add("a", keys[3:])  # 10 keys >= width 4: only the Gram matrix is kept
    loaded = PreservedKeys.from_bytes(found.to_bytes())
    assert loaded.count("a") == 10 and loaded.count("b") == 1
    torch.testing.assert_close(loaded.gram("a", 4), keys.T @ keys, rtol=1e-5, atol=1e-5)
    events: list[str] = []
    assert loaded.gram("b", 8, lambda message, **_: events.append(message)) is None
    assert events == ["preserved keys: width changed, dropped"] and loaded.count("b") == 0


PROJECTED = {**QUICK, "projection": "null_space", "nullspace_threshold": 1.0}


def test_projected_memit_moves_facts_to_their_targets(data_dir: Path) -> None:
    model, tok = build_editable("llama", seed=0), build_tiny_tokenizer()
    config = memit.MemitConfig(
        facts=FACTS, layers=[0, 1], mom2_weight=0.01, nullspace_l2=1e-3, **PROJECTED
    )
    targets = site_targets(model, tok, config, data_dir)
    before = (targets - last_layer_outputs(model, tok, config)).norm(dim=-1)
    result = get_method("memit").run(model, tok, config, context(data_dir))
    after = (targets - last_layer_outputs(model, tok, config)).norm(dim=-1)
    assert (after < 0.3 * before).all(), (before.tolist(), after.tolist())
    spaces = result.resolved["null_space"]["layers"]
    assert set(spaces) == {"0", "1"} and all(s["rank"] > 0 for s in spaces.values())
    assert set(result.resolved["statistics"]) == {"0", "1"}
    stored = PreservedKeys.from_bytes(result.artifacts[PRESERVED_KEYS_ARTIFACT])
    assert stored.count(get_adapter(model).mlp_out_path(1)) == len(FACTS)


def test_projected_rome_edit_takes(data_dir: Path) -> None:
    model, tok = build_editable("llama"), build_tiny_tokenizer()
    adapter = get_adapter(model)
    original = adapter.mlp_out(1).weight.detach().clone()
    before = target_logp(model, tok)
    config = rome.RomeConfig(facts=[FACT], layer=1, **PROJECTED)
    result = get_method("rome").run(model, tok, config, context(data_dir))
    assert target_logp(model, tok) > before + 0.5
    change = (adapter.mlp_out(1).weight.detach() - original).double()
    assert torch.linalg.matrix_rank(change, rtol=1e-5) == 1
    assert result.resolved["null_space"]["layers"]["1"]["preserved_keys"] == 0


def rome_job(env: dict[str, Any], base: str, fact: dict[str, Any], **fields: Any) -> Any:
    operation = {"method": "rome", "facts": [fact], "layer": 1, **QUICK, **fields}
    events: list[dict[str, Any]] = []
    outcome = run_job(env, [operation], base=base, emit=events.append)
    assert outcome.state == "SUCCEEDED", outcome.error
    return outcome, events


def test_chained_jobs_preserve_earlier_keys_and_reuse_statistics(
    job_env: dict[str, Any], tmp_path: Path
) -> None:
    """Job 1 stores its fact's key (``projection: auto`` with nothing earlier: unprojected);
    job 2 on its version reads it, so ``auto`` projects, keeps it and adds its own; both used
    the same statistics (an edit of the projection does not change the keys it is computed
    from), computed once; the export still loads plainly."""
    store = job_env["store"]
    first, _ = rome_job(job_env, str(job_env["folder"]), FACT)
    second_fact = {"prompt": "{} speaks", "subject": "she", "target_new": "japanese"}
    second, events = rome_job(job_env, first.version_id, second_fact, nullspace_threshold=1.0)
    assert not any(e.get("message", "").endswith("computing") for e in events)
    module = get_adapter(build_editable("llama")).mlp_out_path(1)
    for version, count in ((first.version_id, 1), (second.version_id, 2)):
        carried = PreservedKeys.from_bytes(store.read_file(version, PRESERVED_KEYS_ARTIFACT))
        assert carried.count(module) == count
    ops = [store.get(v.version_id).operations[0] for v in (first, second)]
    assert ops[0]["statistics"] == ops[1]["statistics"]
    assert set(ops[0]["statistics"]["1"]) == {"key_digest", "samples", "window", "seed"}
    assert [op["projection"] for op in ops] == ["none", "null_space"]
    assert ops[1]["null_space"]["layers"]["1"]["preserved_keys"] == 1
    folder = store.export(second.version_id, tmp_path / "export")
    assert (folder / PRESERVED_KEYS_ARTIFACT).is_file()
    plain = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(
        plain.get_submodule(module).weight, store.tensor(second.version_id, f"{module}.weight")
    )
