"""Every bound the service puts on a request or a resource, in one place.

Torch-free and import-free (the thin client checks specs with these before sending them; the
method configs use them in their pydantic ``Field`` bounds; the server checks requests and sizes
its caches with them). The values are generous: a real job on a 7B model stays well inside
each one; what they stop is a request that would take the server down for everyone (a 25,000-gate
spec, 20,000 operations, a million epochs). docs/operations.md lists them ("Limits").
"""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

# --- a job spec ----------------------------------------------------------------------------
MAX_SPEC_BYTES = 2 * MIB
"""A spec as compact JSON (what the job table stores): room for 10,000 MEMIT facts, while a
``Job`` carrying it stays well under the 4 MiB message limit of GetJob."""
MAX_OPERATIONS = 32
MAX_GATES = 64
MAX_GATE_NAME_CHARS = 128
MAX_GATE_CONDITION_CHARS = 64
MAX_REFERENCE_CHARS = 1024
"""``base``: a model reference, version id or alias."""

# --- per-job deadline ----------------------------------------------------------------------
DEFAULT_MAX_JOB_SECONDS = 24 * 3600.0
"""``serve --max-job-seconds``: the longest ``timeout_s`` a spec may ask for, and the deadline
of a job that asks for none."""

# --- method configs ------------------------------------------------------------------------
MAX_MEMIT_FACTS = 10_000
MAX_ROME_FACTS = 1_000
"""ROME applies its facts one after another (one v* optimisation each): MEMIT is for batches."""
MAX_LORA_FACTS = 10_000
MAX_EXAMPLES = 10_000
"""ReFT and LoRA ``{prompt, completion}`` examples, inline or in ``examples_file``."""
MAX_PAIRS = 10_000
"""Contrast pairs (steer, iti, ablate_direction, mask_biased_heads) and iti question records."""
MAX_PROMPT_LIST = 10_000
"""``kl_prompts`` and other lists of prompts a method reads."""
MAX_CONTEXT_TEMPLATES = 256
MAX_EPOCHS = 1_000
MAX_BATCH_SIZE = 1_024
MAX_SEQUENCE_TOKENS = 8_192
"""Training ``max_length``, calibration/statistics/text windows, perplexity windows."""
MAX_CALIBRATION_SAMPLES = 4_096
"""prune's ``calibration_samples``, ablate_direction's and mask_biased_heads'
``calibration_windows``."""
MAX_STATISTICS_SAMPLES = 100_000
"""ROME/MEMIT ``stats_samples``: windows for C = E[k k^T] (ROME's own mom2_n_samples)."""
MAX_TEXT_SAMPLES = 100_000
"""LoRA ``text_samples``: random training windows of the text file."""
MAX_PERPLEXITY_TOKENS = 1 << 20
MAX_HEADS = 16_384
"""Head lists and head counts (mask_heads ``heads``, ``top_k``, ``shortlist_size``)."""
MAX_RANK = 4_096
MAX_OPTIMISATION_STEPS = 1_000

# --- Generate ------------------------------------------------------------------------------
MAX_PROMPTS = 16
MAX_NEW_TOKENS = 512
MAX_PROMPT_TOKENS = 4_096
"""Per prompt, after the chat template; less when the model has fewer positions."""
MAX_PROMPT_CHARS = 64 * KIB
"""Refused before any tokenizer runs (no tokenizer makes 4,096 tokens of more text)."""
MAX_GENERATE_SECONDS = 600.0
"""A Generate without a client deadline stops after this long."""

# --- model files -------------------------------------------------------------------------
# transformers reads a GGUF file's metadata and tensor list into Python objects before a job is
# admitted (tens of bytes per array item with its own reader, about 1 KB with the ``gguf``
# package's, used for some architectures); these bounds keep a hostile file under a model root
# from costing the server gigabytes and minutes. Real files stay far inside them.
MAX_GGUF_TENSORS = 1 << 16
"""Tensors one GGUF file declares (a 400B or mixture-of-experts model has a few thousand)."""
MAX_GGUF_METADATA_KEYS = 1 << 14
"""Metadata entries (real files have tens)."""
MAX_GGUF_ARRAY_ITEMS = 1 << 20
"""Items in one metadata array (Gemma 3's vocabulary is 262,144 tokens, Llama 3's merges
280,147)."""
MAX_GGUF_METADATA_ITEMS = 1 << 21
"""Items in all metadata arrays together, a string counting twice (the reader keeps its length
and its bytes apart): a Gemma 3 file needs about 1,050,000."""
MAX_GGUF_NAME_BYTES = (1 << 16) - 1
"""A metadata key or tensor name (the GGUF specification's bound on keys)."""

# --- responses and caches ------------------------------------------------------------------
LIST_RESPONSE_BYTES = 3 * MIB
"""A ``ListJobs`` page holds jobs up to this many serialized bytes (4 MiB is the message
limit), then continues with ``next_page_token``."""
DEFAULT_MAX_EXPORT_BYTES = 20 * GIB
"""``serve --max-export-bytes``: exported folders kept for downloads, least recently used out."""


def job_deadline_seconds(timeout_s: float, max_job_seconds: float) -> float:
    """The deadline a job runs under: its ``timeout_s``, or the server's maximum if none."""
    return timeout_s if timeout_s > 0 else max_job_seconds
