"""What a job costs in memory: peak proportional set size (PSS) of the whole process tree of
`modelsurgery apply --local` (and of local Generate and export) against the weights' bytes,
on random Llama-shaped models of growing size (issue 34).

    .venv/bin/python benchmarks/memory_scale.py --sizes tiny 0.1b
    .venv/bin/python benchmarks/memory_scale.py --sizes 0.8b --methods rome --dtype float32
    .venv/bin/python benchmarks/memory_scale.py --sizes 0.1b 0.8b 3b --dtype bfloat16

Models are random (std 0.02) Llama configs with SmolLM2-135M's tokenizer and vocabulary,
written tensor by tensor into one safetensors file, so building a model never holds more than
one tensor; folders are cached under ``--work-dir/models`` and reused. Sizes: ``tiny`` (hidden
64, 2 layers: the fixed-cost baseline), ``0.1b`` (SmolLM2-135M's shape), ``0.8b`` (hidden
2048, MLP 5632, 16 layers, 16 heads, 4 KV heads: issue 34's 822M model), ``3b`` (hidden 3072,
MLP 8192, 26 layers, 24 heads, 8 KV heads).

Each method is a cheap job (a few optimisation steps, no evaluation) in a child process with a
fresh MODELSURGERY_HOME per size, one at a time; Generate and export run the local CLI
(`generate`, `versions export`, no server) on the version the rome job made. Every ~50 ms the
PSS of the child and all its descendants (embedded Ray's raylet and workers included; a
process seen once is followed even after it leaves the tree) is summed and the peak kept.
``tiny`` always runs first: its peak per method is the fixed cost (Python, torch, Ray, the
tokenizer), and ``(peak - fixed) / weights`` is what the model's size adds.
Prints one JSON line per (size, method), then a table with the ratios and the same as
Markdown for docs/operations.md ("How much memory a job needs").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from modelsurgery.editing.data import shared_data_path
from modelsurgery.models.hardware import describe

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "mlp": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "0.1b": {"hidden": 576, "mlp": 1536, "layers": 30, "heads": 9, "kv_heads": 3},
    "0.8b": {"hidden": 2048, "mlp": 5632, "layers": 16, "heads": 16, "kv_heads": 4},
    "3b": {"hidden": 3072, "mlp": 8192, "layers": 26, "heads": 24, "kv_heads": 8},
}
BASELINE = "tiny"
METHODS = [
    "rome",
    "memit",
    "reft",
    "steer",
    "mask_heads",
    "prune_structured",
    "prune_2_4",
    "lora",
    "generate",
    "export",
]
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}
CLI = [sys.executable, "-m", "modelsurgery.client.cli"]
GB = 1e9
EXAMPLES = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "Water freezes at", "completion": " zero degrees Celsius."},
    {"prompt": "The largest planet is", "completion": " Jupiter."},
    {"prompt": "Two plus two is", "completion": " four."},
]
PAIRS = [
    {"positive": "I loved this film, it was wonderful.", "negative": "I hated this film."},
    {"positive": "The food was delicious and fresh.", "negative": "The food was awful."},
    {"positive": "What a great, happy day.", "negative": "What a terrible, sad day."},
    {"positive": "The staff were kind and helpful.", "negative": "The staff were rude."},
]
CHEAP_CALIBRATION = {
    "calibration_samples": 8,
    "calibration_seqlen": 128,
    "evaluate_perplexity": False,
    "measure_latency": False,
}


# --- models --------------------------------------------------------------------------------
def smollm2_tokenizer(work_dir: Path) -> Path:
    """SmolLM2-135M's tokenizer, read from the built-in alias's GGUF once (~20 s) and saved."""
    folder = work_dir / "tokenizer-smollm2"
    if not folder.is_dir():
        from modelsurgery.models.aliases import BUILTIN_ALIASES
        from modelsurgery.models.gguf import load_gguf_tokenizer

        alias = BUILTIN_ALIASES["smollm2-135m"]
        alias.check_installed()
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        load_gguf_tokenizer(alias.locate()).save_pretrained(partial)
        partial.rename(folder)
    return folder


def llama_config(size: str, dtype: torch.dtype, vocab: int) -> Any:
    """SmolLM2-135M's config (tied embeddings, its token ids) with this size's shape."""
    from transformers import LlamaConfig

    shape = SHAPES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype=dtype,
    )


def tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the saved tensors, from a model on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: Any) -> None:
    """One safetensors file written a tensor at a time (header first, offsets known from the
    shapes): building the file never holds the model, so a 3B float32 model fits beside jobs."""
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + math.prod(shape) * size
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(0)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=dtype)
            else:
                tensor = torch.randn(shape, generator=generator).mul_(0.02).to(dtype)
            handle.write(tensor.contiguous().view(torch.uint8).numpy().data)


def build_model(work_dir: Path, size: str, dtype: torch.dtype) -> Path:
    """The model folder for ``size`` (built once; a present folder is complete)."""
    folder = work_dir / "models" / f"llama-{size}-{str(dtype).removeprefix('torch.')}"
    if folder.is_dir():
        return folder
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer(work_dir))
    config = llama_config(size, dtype, len(tokenizer))
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    write_random_safetensors(partial / "model.safetensors", tensor_shapes(config), dtype)
    config.save_pretrained(partial)
    GenerationConfig.from_model_config(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    print(f"built {folder} in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            names = handle.keys()
            total += sum(math.prod(handle.get_slice(n).get_shape()) for n in names)
    return total


# --- job specs -----------------------------------------------------------------------------
def counterfact(n: int) -> list[dict[str, Any]]:
    return json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())[:n]


def operation(method: str, layers: int) -> dict[str, Any]:
    """The method's operation, as cheap as it allows: a few steps, no evaluation."""
    knowledge: dict[str, Any] = {
        "stats_samples": 16,
        "v_steps": 5,
        "evaluate": False,
        "evaluate_perplexity": False,
    }
    operations: dict[str, dict[str, Any]] = {
        "rome": {"method": "rome", "facts": counterfact(1), **knowledge},
        "memit": {"method": "memit", "facts": counterfact(20), **knowledge},
        "reft": {
            "method": "reft",
            "layers": [layers // 2],
            "examples": EXAMPLES,
            "epochs": 1,
            "batch_size": 2,
        },
        "steer": {"method": "steer", "pairs": PAIRS, "evaluate_perplexity": False},
        "mask_heads": {"method": "mask_heads", "heads": ["0.0", f"{layers - 1}.1"]},
        "prune_structured": {
            "method": "prune",
            "kind": "structured",
            "ratio": 0.2,
            **CHEAP_CALIBRATION,
        },
        "prune_2_4": {"method": "prune", "kind": "nm", "n": 2, "m": 4, **CHEAP_CALIBRATION},
        "lora": {
            "method": "lora",
            "text": "wikitext-2/valid.tokens",
            "text_samples": 4,
            "text_window": 64,
            "epochs": 1,
            "batch_size": 2,
            "evaluate_perplexity": False,
        },
    }
    return operations[method]


# --- measuring -----------------------------------------------------------------------------
@dataclass
class TreeSampler:
    """Peak PSS summed over a process and every descendant it has had."""

    root: psutil.Process
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    peak: int = 0
    peak_processes: int = 0
    peak_top: tuple[str, int] = ("", 0)

    def sample(self) -> None:
        try:
            for process in [self.root, *self.root.children(recursive=True)]:
                self.seen.setdefault(process.pid, process)
        except psutil.NoSuchProcess:
            pass
        sizes: list[tuple[str, int]] = []
        for pid, process in list(self.seen.items()):
            try:
                with process.oneshot():
                    sizes.append((process.name(), process.memory_full_info().pss))
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                del self.seen[pid]
            except psutil.AccessDenied:
                continue
        total = sum(pss for _, pss in sizes)
        if total > self.peak:
            self.peak, self.peak_processes = total, len(sizes)
            self.peak_top = max(sizes, key=lambda item: item[1])

    def stop_all(self) -> None:
        """Kill what is left of the tree (a timed-out job): only processes this run started."""
        for process in self.seen.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue


@dataclass
class Measured:
    exit_code: int
    seconds: float
    peak_pss: int
    processes: int
    top: tuple[str, int]
    stdout: str
    stderr: str


def measure(
    command: list[str], env: dict[str, str], log: Path, interval: float, timeout: float
) -> Measured:
    """Run ``command``, sampling its process tree every ``interval`` s until it exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    start = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        sampler = TreeSampler(psutil.Process(child.pid))
        while child.poll() is None:
            sampler.sample()
            if time.perf_counter() - start > timeout:
                sampler.stop_all()
                child.wait()
                break
            time.sleep(interval)
        seconds = time.perf_counter() - start
    return Measured(
        exit_code=child.returncode,
        seconds=seconds,
        peak_pss=sampler.peak,
        processes=sampler.peak_processes,
        top=sampler.peak_top,
        stdout=out_path.read_text(),
        stderr=err_path.read_text(),
    )


def cli_json(text: str) -> dict[str, Any]:
    """The CLI's ``--json`` object (the whole of its stdout), or {} when it printed none."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class SizeRun:
    """One size's model folder and a fresh home (store, caches) for its jobs."""

    size: str
    folder: Path
    home: Path
    env: dict[str, str]
    args: argparse.Namespace
    rome_version: str | None = None

    def run(self, method: str) -> tuple[Measured, dict[str, Any]]:
        log = self.home / "logs" / method
        if method in ("generate", "export"):
            version = self.rome_version or self.import_base()
            if method == "generate":
                command = [*CLI, "generate", version, "The capital of France is"]
                command += ["--max-new-tokens", "8", "--json"]
            else:
                target = self.home / "export" / version
                command = [*CLI, "versions", "export", version, str(target), "--json"]
            measured = measure(command, self.env, log, self.args.interval, self.args.timeout)
            shutil.rmtree(self.home / "export", ignore_errors=True)
            return measured, {}
        layers = SHAPES[self.size]["layers"]
        spec = self.home / "specs" / f"{method}.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(
            json.dumps({"base": str(self.folder), "operations": [operation(method, layers)]})
        )
        command = [*CLI, "apply", str(spec), "--local", "--wait", "--new", "--json"]
        measured = measure(command, self.env, log, self.args.interval, self.args.timeout)
        summary = cli_json(measured.stdout)
        if method == "rome" and measured.exit_code == 0:
            self.rome_version = summary.get("version_id")
        return measured, summary

    def import_base(self) -> str:
        """The base as a stored version, for Generate and export when no rome job ran."""
        done = subprocess.run(
            [*CLI, "import", str(self.folder), "--json"],
            capture_output=True,
            text=True,
            env=self.env,
            check=True,
        )
        return str(cli_json(done.stdout)["id"])


def size_run(args: argparse.Namespace, size: str, dtype: torch.dtype) -> SizeRun:
    folder = build_model(args.work_dir, size, dtype)
    home = args.work_dir / "runs" / folder.name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "MODELSURGERY_SERVER"}
    env |= {"MODELSURGERY_HOME": str(home), "MODELSURGERY_CACHE": str(home / "cache")}
    return SizeRun(size, folder, home, env, args)


# --- report --------------------------------------------------------------------------------
def report_rows(rows: list[dict[str, Any]]) -> None:
    baseline = {r["method"]: r["peak_pss"] for r in rows if r["size"] == BASELINE}
    header = (
        f"{'size':>5} {'params':>8} {'method':>16} {'weights GB':>10} {'peak GB':>8} "
        f"{'peak/w':>7} {'fixed GB':>8} {'(peak-fixed)/w':>14} {'job s':>7} {'wall s':>7} "
        f"{'exit':>4}"
    )
    print("\n" + header)
    markdown = [
        "| model | dtype | method | weights | peak PSS | peak / weights | fixed cost | "
        "(peak - fixed) / weights |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fixed = baseline.get(r["method"])
        ratio = r["peak_pss"] / r["weights_bytes"]
        extra = (r["peak_pss"] - fixed) / r["weights_bytes"] if fixed is not None else math.nan
        job = r.get("job_seconds")
        print(
            f"{r['size']:>5} {r['parameters'] / 1e6:>7.0f}M {r['method']:>16} "
            f"{r['weights_bytes'] / GB:>10.3f} {r['peak_pss'] / GB:>8.2f} {ratio:>7.2f} "
            f"{(fixed or 0) / GB:>8.2f} {extra:>14.2f} "
            f"{'-' if job is None else f'{job:.1f}':>7} {r['wall_seconds']:>7.1f} "
            f"{r['exit_code']:>4}"
        )
        if r["size"] != BASELINE and r["exit_code"] == 0:
            markdown.append(
                f"| {r['size']} ({r['parameters'] / 1e6:.0f}M) | {r['dtype']} | {r['method']} "
                f"| {r['weights_bytes'] / GB:.2f} GB | {r['peak_pss'] / GB:.2f} GB "
                f"| {ratio:.2f}x | {(fixed or 0) / GB:.2f} GB | {extra:.2f}x |"
            )
    fixed_line = ", ".join(f"{m} {v / GB:.2f} GB" for m, v in baseline.items())
    print(f"\nfixed cost ({BASELINE} model, same run): {fixed_line}\n")
    print("\n".join(markdown), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=["tiny", "0.1b"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "modelsurgery-memory"
    )
    parser.add_argument("--interval", type=float, default=0.05, help="PSS sampling period (s)")
    parser.add_argument("--timeout", type=float, default=3600, help="per job (s)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(describe(), flush=True)
    sizes = [BASELINE, *(s for s in args.sizes if s != BASELINE)]
    methods = list(args.methods)
    if {"generate", "export"} & set(methods) and "rome" in methods:
        methods.remove("rome")
        methods.insert(0, "rome")  # Generate and export run on the version rome made

    rows = []
    for size in sizes:
        run = size_run(args, size, dtype)
        params, weights = parameter_count(run.folder), weights_bytes(run.folder)
        print(f"{size}: {params / 1e6:.1f}M parameters, {weights / GB:.3f} GB", flush=True)
        for method in methods:
            measured, summary = run.run(method)
            metrics = summary.get("metrics", {})
            row = {
                "size": size,
                "dtype": args.dtype,
                "method": method,
                "parameters": params,
                "weights_bytes": weights,
                "peak_pss": measured.peak_pss,
                "peak_over_weights": round(measured.peak_pss / weights, 3),
                "processes_at_peak": measured.processes,
                "largest_process_at_peak": [measured.top[0], measured.top[1]],
                "job_seconds": metrics.get("job_seconds"),
                "wall_seconds": round(measured.seconds, 2),
                "exit_code": measured.exit_code,
                "state": summary.get("state"),
            }
            if measured.exit_code != 0:
                row["error"] = (summary.get("error") or measured.stderr[-2000:]).strip()
            print(json.dumps(row), flush=True)
            rows.append(row)
    report_rows(rows)


if __name__ == "__main__":
    main()
