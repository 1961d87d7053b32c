"""Version, alias, import and generate commands: on the local store, or a server (--server)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from modelsurgery.client.backends import LocalBackend, RemoteBackend, VersionBackend
from modelsurgery.client.cli_common import (
    CaOption,
    JsonOption,
    ServerOption,
    StoreOption,
    TokenOption,
    connect,
    count_progress,
    emit_json,
    export_warnings,
    fail,
    id_column,
    local_store,
    out,
    plain_row,
    reported_errors,
)
from modelsurgery.client.connection import UNSET

versions_app = typer.Typer(help="Immutable checkpoint versions.", no_args_is_help=True)
heads_app = typer.Typer(help="Attention-head bias scores.", no_args_is_help=True)
HEAD_SCORES = "head_scores.json"
alias_app = typer.Typer(help="Mutable names for versions (compare-and-swap).", no_args_is_help=True)


@contextmanager
def backend(
    server: str | None, token: str | None, tls_ca: Path | None, store: Path | None, as_json: bool
) -> Iterator[VersionBackend]:
    with reported_errors(as_json):
        if server:
            with connect(server, token, tls_ca) as client:
                yield RemoteBackend(client)
        else:
            yield LocalBackend(local_store(store))


def _version_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(id_column("version"), id_column("parent"), "base", "methods", "created")
    for row in rows:
        plain_row(
            table,
            row["id"],
            row["parent"] or "-",
            row["root_reference"],
            ",".join(row["methods"]) or "(import)",
            row.get("created", ""),
        )
    return table


@versions_app.command("list")
def versions_list(
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """List versions, newest first."""
    with backend(server, token, tls_ca, store, as_json) as b:
        rows = b.list_versions()
        if as_json:
            emit_json(rows)
        else:
            out.print(_version_table(rows))


@versions_app.command("show")
def versions_show(
    ref: Annotated[str, typer.Argument(help="Version id, unique prefix or alias.")],
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """A version's lineage, operations, metrics and aliases."""
    with backend(server, token, tls_ca, store, as_json) as b:
        info = b.show(ref)
        if as_json:
            emit_json(info)
            return
        out.print(escape(f"version {info['id']}  (base {info['root_reference']})"))
        out.print(escape("lineage: " + " <- ".join(info["lineage"])))
        if info["aliases"]:
            out.print(escape("aliases: " + ", ".join(info["aliases"])))
        for op in info["manifest"].get("operations", []):
            out.print(escape(f"operation: {op}"))
        for name, value in sorted(info["metrics"].items()):
            out.print(escape(f"  {name} = {value:.6g}"))
        out.print(f"tensors stored in this version: {len(info['manifest'].get('tensors', {}))}")


@versions_app.command("diff")
def versions_diff(
    a: str,
    b: str,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Tensors that differ between two versions, with the relative norm of the change."""
    with backend(server, token, tls_ca, store, as_json) as be:
        changes = be.diff(a, b)
        if as_json:
            emit_json(changes)
            return
        table = Table("tensor", "status", "relative change")
        for c in changes:
            norm = c["relative_norm"]
            plain_row(table, c["name"], c["status"], "-" if norm is None else f"{norm:.4g}")
        out.print(table)


@versions_app.command("export")
def versions_export(
    ref: str,
    folder: Annotated[Path, typer.Argument(help="Folder to write (from_pretrained loads it).")],
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Export a version to a folder plain transformers loads (downloads it from a server),
    with a model card (README.md). A version whose edit lives in hooks (ReFT, unbaked steer)
    loads there as the unedited base: a warning says so and how to load it instead."""
    with (
        backend(server, token, tls_ca, store, as_json) as b,
        export_warnings(),
        count_progress("export", not as_json) as progress,
    ):
        path = b.export(ref, folder, progress)
        if as_json:
            emit_json({"ref": ref, "folder": str(path)})
        else:
            out.print(escape(f"exported {ref} to {path}"))


@versions_app.command("revert")
def versions_revert(
    ref: str,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Make a new version whose tensors are REF's parent's."""
    with backend(server, token, tls_ca, store, as_json) as b:
        row = b.revert(ref)
        if as_json:
            emit_json(row)
        else:
            out.print(escape(f"version {row['id']} reverts {ref}"))


@versions_app.command("verify")
def versions_verify(as_json: JsonOption = False, store: StoreOption = None) -> None:
    """Re-hash every blob of the local store and check every manifest and alias."""
    with reported_errors(as_json):
        report = local_store(store).verify()
    if as_json:
        emit_json({"ok": report.ok, "problems": report.problems})
    elif report.ok:
        out.print("[green]store verified: no problems[/green]")
    else:
        for problem in report.problems:
            out.print(Text(problem, style="red"))
    if not report.ok:
        raise typer.Exit(1)


@alias_app.command("set")
def alias_set(
    name: str,
    version: str,
    expected: Annotated[
        str | None,
        typer.Option(help="Only move it if it points here now ('none': must not exist)."),
    ] = None,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Point an alias at a version (compare-and-swap with --expected)."""
    expect: Any = UNSET if expected is None else (None if expected == "none" else expected)
    with backend(server, token, tls_ca, store, as_json) as b:
        target = b.set_alias(name, version, expect)
        if as_json:
            emit_json({"name": name, "version_id": target})
        else:
            out.print(escape(f"{name} -> {target}"))


@alias_app.command("list")
def alias_list(
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Every alias, the version it points at and who created it."""
    with backend(server, token, tls_ca, store, as_json) as b:
        rows = b.list_aliases()
    if as_json:
        emit_json(rows)
        return
    table = Table("alias", id_column("version"), "owner")
    for row in rows:
        plain_row(table, row["name"], row["version_id"], row["owner"] or "-")
    out.print(table)


@alias_app.command("delete")
def alias_delete(
    name: str,
    expected: Annotated[
        str | None, typer.Option(help="Only delete it if it points here now.")
    ] = None,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Delete an alias (on a server: its owner or an admin); the version stays."""
    with backend(server, token, tls_ca, store, as_json) as b:
        target = b.delete_alias(name, UNSET if expected is None else expected)
        if target is None:
            fail(f"no alias {name!r}", 1, as_json=as_json)
    if as_json:
        emit_json({"name": name, "version_id": target})
    else:
        out.print(escape(f"deleted {name} (was {target})"))


@alias_app.command("get")
def alias_get(
    name: str,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """The version an alias points at."""
    with backend(server, token, tls_ca, store, as_json) as b:
        target = b.get_alias(name)
        if target is None:
            fail(f"no alias {name!r}", 1, as_json=as_json)
        if as_json:
            emit_json({"name": name, "version_id": target})
        else:
            out.print(escape(target))


def import_model(
    model: Annotated[str, typer.Argument(help="HF folder, GGUF file or alias (smollm2-135m).")],
    alias: Annotated[str | None, typer.Option(help="Point this alias at it.")] = None,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Import a base model into the store and print its version."""
    with (
        backend(server, token, tls_ca, store, as_json) as b,
        count_progress("import", not as_json) as progress,
    ):
        row = b.import_model(model, alias, progress)
        if as_json:
            emit_json(row)
        else:
            out.print(escape(f"imported {model} as version {row['id']}"))


def generate(
    version: Annotated[str, typer.Argument(help="Version id, prefix or alias.")],
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the chat template.")] = False,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Generate text from a version (ReFT interventions applied when it has them)."""
    options = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "chat": chat,
    }
    with backend(server, token, tls_ca, store, as_json) as b:
        completions = b.generate(version, list(prompt), options)
        if as_json:
            emit_json({"version": version, "prompts": prompt, "completions": completions})
            return
        for p, completion in zip(prompt, completions, strict=True):
            out.print(f"[bold]{escape(p)}[/bold]{escape(completion)}")


@versions_app.command("artifact")
def versions_artifact(
    ref: str,
    name: Annotated[str, typer.Argument(help="e.g. head_scores.json, reft/config.json")],
    output: Annotated[Path | None, typer.Option("--out", help="Write here, not stdout.")] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """A small file a version carries (a head score table, a ReFT config)."""
    with backend(server, token, tls_ca, store, False) as b:
        data = b.artifact(ref, name)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)


@heads_app.command("plot")
def heads_plot(
    ref: Annotated[str, typer.Argument(help="A mask_biased_heads version.")],
    output: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("heads.png"),
    key: Annotated[str, typer.Option(help="Score table: gradient or ablation.")] = "gradient",
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Plot a version's head bias scores as a layer x head heat map (chosen heads boxed)."""
    with backend(server, token, tls_ca, store, as_json) as b:
        from modelsurgery.editing.bias.plot import plot_head_scores

        table = b.artifact(ref, HEAD_SCORES)
        plot_head_scores(table, output, key=key)
    if as_json:
        emit_json({"ref": ref, "png": str(output)})
    else:
        out.print(escape(f"wrote {output}"))


def register_version_commands(app: typer.Typer) -> None:
    app.add_typer(versions_app, name="versions")
    app.add_typer(heads_app, name="heads")
    app.add_typer(alias_app, name="alias")
    app.command("import")(import_model)
    app.command("generate")(generate)
