"""`DraftLM`: a small standalone Llama-style draft model for a target's tokenizer (reduced draft
vocabulary, static KV cache, one safetensors file).

    format.py   the file format: target identity, checked safetensors I/O, head-file helpers
    layers.py   `DraftConfig` and the Llama layers (RMSNorm, RoPE, `DraftBlock`)
    model.py    `DraftLM` and its file: `save_draft`, `load_draft`, `read_draft_metadata`
    twin.py     `transformers_twin`: a `DraftLM` as transformers' `LlamaForCausalLM` (not re-exported)

Every name is re-exported here: ``from hierspec.models.draft import DraftLM, load_draft, ...``.
"""

from hierspec.models.draft.format import (
    FORMAT_DRAFT,
    FORMAT_VERSION,
    HALF_DTYPES,
    DraftFileError,
    TargetIdentity,
    check_vocab_map,
    load_head_state,
    parse_json_meta,
    read_head_file,
    read_safetensors,
    storage_dtype,
    target_identity,
    tokenizer_fingerprint,
    write_head_file,
    write_safetensors,
)
from hierspec.models.draft.layers import DraftBlock, DraftConfig, RMSNorm, rope_tables, rotate_half
from hierspec.models.draft.model import DraftLM, load_draft, read_draft_metadata, save_draft

__all__ = [
    "FORMAT_DRAFT",
    "FORMAT_VERSION",
    "HALF_DTYPES",
    "DraftBlock",
    "DraftConfig",
    "DraftFileError",
    "DraftLM",
    "RMSNorm",
    "TargetIdentity",
    "check_vocab_map",
    "load_draft",
    "load_head_state",
    "parse_json_meta",
    "read_draft_metadata",
    "read_head_file",
    "read_safetensors",
    "rope_tables",
    "rotate_half",
    "save_draft",
    "storage_dtype",
    "target_identity",
    "tokenizer_fingerprint",
    "write_head_file",
    "write_safetensors",
]
