"""The thin client: the SDK, the CLI and spec parsing import no ML stack; the spec's JSON Schema
describes every method's operation; commands that run models here name the server extra."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from modelsurgery.client.cli import app
from modelsurgery.editing.registry import method_names
from modelsurgery.proto.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "ray", "matplotlib", "safetensors")
SERVER_SIDE = (
    *HEAVY,
    "modelsurgery.checkpoints",
    "modelsurgery.models",
    "modelsurgery.server",
    "modelsurgery.editing",
    "modelsurgery.pruning",
    "modelsurgery.evaluation",
)
# (client module, function) where the ML stack may be imported: the commands that run models in
# this process. Everything else, the SDK's download included, works on a thin install.
RUNS_MODELS_HERE = {
    ("backends.py", "generate"),
    ("backends.py", "import_model"),
    ("cli.py", "apply"),
    ("cli.py", "serve"),
    ("cli_common.py", "local_store"),
    ("cli_versions.py", "heads_plot"),
}
FACT = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
}
PAIRS = [{"positive": "good", "negative": "bad"}, {"positive": "yes", "negative": "no"}]
RECORDS = [
    {"question": "Is the sky blue?", "true": "yes", "false": ["no"]},
    {"question": "Is fire cold?", "true": ["no"], "false": "yes"},
]
# One valid operation per method: a new method adds its own (test_every_method_has_an_example).
EXAMPLES = {
    "ablate_direction": {"dataset": "winogender", "layer": 2},
    "concept_bottleneck": {"dataset": "cebab", "layers": [1]},
    "iti": {"records": RECORDS, "top_k": 2},
    "lora": {"text": "wikitext-2/valid.tokens", "rank": 4, "merge": False},
    "mask_biased_heads": {"bias_types": ["gender"], "top_k": 2},
    "mask_heads": {"heads": ["0.1", "1.0"]},
    "memit": {"facts": [FACT], "layers": [1, 2]},
    "ultraedit": {"facts": [FACT], "layers": [1, 2]},
    "prune": {"kind": "structured", "ratio": 0.25, "per_layer_ratios": {0: 0.25}},
    "reft": {"layers": [0], "examples": [{"prompt": "a", "completion": "b"}]},
    "rome": {"facts": [FACT], "layer": 1},
    "steer": {"pairs": PAIRS, "layers": [0]},
}
REAL_SPEC = """\
base: smollm2-135m
operations:
  - method: rome
    facts:
      - prompt: "The mother tongue of {} is"
        subject: Danielle Darrieux
        target_new: English
        ground_truth: French
        rephrase_prompt: ["Danielle Darrieux speaks"]
  - method: prune
    kind: structured
    ratio: 0.25
    calibration_dtype: auto
  - method: lora
    text: wikitext-2/valid.tokens
    merge: true
gates:
  efficacy: ">= 0.9"
  perplexity_ratio: "<= 1.1"
alias: patched
"""


def every_example() -> dict[str, object]:
    return {
        "base": "smollm2-135m",
        "operations": [{"method": name, **config} for name, config in EXAMPLES.items()],
    }


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_method_has_an_example() -> None:
    assert sorted(EXAMPLES) == method_names()
    assert len(parse_spec(every_example()).operations) == len(EXAMPLES)


def test_client_and_spec_parsing_import_no_ml_stack() -> None:
    probe = run_python(
        """
        import json, sys
        heavy = json.loads(sys.argv[1])
        loaded = lambda: sorted(m for m in heavy if m in sys.modules)
        import modelsurgery.client
        import modelsurgery.client.cli
        after_import = loaded()
        from modelsurgery.proto.spec import parse_spec, spec_json_schema
        spec = parse_spec(json.loads(sys.argv[2]))
        spec.to_proto()
        spec_json_schema()
        print(json.dumps({"import": after_import, "parse": loaded()}))
        """,
        json.dumps(HEAVY),
        json.dumps(every_example()),
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"import": [], "parse": []}


def server_side_imports(path: Path) -> set[tuple[str, str]]:
    """(module file, enclosing function) of every import of a server-side package."""
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                modules = [alias.name for alias in child.names]
            else:
                modules = [child.module or ""] if isinstance(child, ast.ImportFrom) else []
            if any(m == p or m.startswith(f"{p}.") for m in modules for p in SERVER_SIDE):
                found.add((path.name, function))
            inside = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, child.name if inside else function)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def test_only_commands_that_run_models_import_the_server_side() -> None:
    found = set().union(*(server_side_imports(p) for p in (ROOT / "client").glob("*.py")))
    assert found <= RUNS_MODELS_HERE


def schema() -> dict[str, object]:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_schema_validates_real_specs_and_refuses_unknown_keys() -> None:
    validator = jsonschema.Draft202012Validator(schema())
    real = yaml.safe_load(REAL_SPEC)
    validator.validate(real)
    parse_spec(real)
    validator.validate(json.loads(json.dumps(every_example())))
    validator.validate(yaml.safe_load((ROOT / "examples" / "safety-patch.yaml").read_text()))
    # ``layers`` is EasyEdit's key, which rome accepts (issue 31); ``layer_index`` is no key.
    typo = {**real, "operations": [{**real["operations"][0], "layer_index": 3}]}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(typo)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**real, "operations": [{"method": "rome"}]})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**real, "operations": [{"method": "nope"}]})


def test_version_prints_the_package_version() -> None:
    from importlib import metadata

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"modelsurgery {metadata.version('modelsurgery')}"


@pytest.mark.parametrize(
    "command",
    [["versions", "list"], ["apply", "--local", str(ROOT / "examples" / "safety-patch.yaml")]],
)
def test_commands_that_run_models_name_the_server_extra(command: list[str], tmp_path) -> None:
    """With the ML stack missing (its imports fail as on a thin install), a command that runs
    models here ends with exit 2 and the install line, not a traceback."""
    result = run_python(
        """
        import json, sys

        class ThinInstall:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in json.loads(sys.argv[1]):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, ThinInstall())
        from modelsurgery.client.cli import app
        app(json.loads(sys.argv[2]), prog_name="modelsurgery")
        """,
        json.dumps(HEAVY),
        json.dumps([*command, "--store", str(tmp_path)]),
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'modelsurgery[server]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_base_install_is_the_client_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split("[")[0].split("=")[0].split(">")[0] for dep in project["dependencies"]}
    assert names == {"grpcio", "grpcio-status", "protobuf", "pydantic", "typer", "rich", "pyyaml"}
    server = " ".join(project["optional-dependencies"]["server"])
    assert all(package in server for package in ("torch", "transformers", "peft", "ray"))
