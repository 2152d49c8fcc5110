"""Training data for draft distillation: text sources -> token-id shards on disk.

Two kinds of sources, written as the same kind of shard:

* ``raw:NAME`` — raw text chunks (fast): documents are tokenized, joined with EOS, packed into
  rows of ``seq_len`` tokens, shuffled once (seeded) and cut into shards. mask = 1 everywhere.
* ``gen:NAME`` — prompts answered by the target itself: chat prompts go through the chat
  template, code / prose prompts are continued as raw text; the target generates the responses
  in left-padded batches with ``model.generate`` (greedy, or sampled at ``temperature``). A row
  is ``prompt + response`` (response cut after the first EOS, which is kept), right-padded to
  ``seq_len``. mask = 1 on prompt tokens, 2 on response tokens, 0 on padding.

Sources (``raw:NAME``, ``gen:NAME``, their names, caps and held-out split): `hierspec.train.sources`.

Layout of a data directory (every file written atomically, so an interrupted job resumes at the
next missing shard)::

    manifest.json              parameters; a second run with other parameters is refused
    tokens/raw-00000.safetensors ...       ids int32 [N, T], mask uint8 [N, T]
    tokens/raw.done            written once every raw shard exists
    tokens/gen0-sharegpt-00000.safetensors one shard per ``shard_rows`` prompts of the first gen source
    teacher/<same stem>.safetensors        teacher top-k (see `hierspec.train.teacher`)
    eval.safetensors           held-out rows (greedy target responses) for evaluation
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hierspec.files import write_json_atomic
from hierspec.models.draft import DraftFileError, read_safetensors, write_safetensors
from hierspec.train.sources import (
    HUMANEVAL_TRAIN_OFFSET,
    SHAREGPT_TRAIN_OFFSET,
    DataError,
    PromptItem,
    Source,
    parse_sources,
    raw_documents,
    source_prompts,
)

__all__ = [
    "HUMANEVAL_TRAIN_OFFSET",
    "SHAREGPT_TRAIN_OFFSET",
    "DataConfig",
    "DataError",
    "PromptItem",
    "Source",
    "TextCodec",
    "build_eval_set",
    "codec_from_tokenizer",
    "generate_responses",
    "list_shards",
    "load_rows",
    "parse_sources",
    "prepare_data",
    "raw_documents",
    "source_prompts",
]

TOKENS_FORMAT = "hierspec.tokens"
MANIFEST_FORMAT = "hierspec.train-data"
_MIN_RESPONSE = 16  # a gen prompt needs room for at least this many response tokens


# ============================================================================ tokenizer glue
@dataclass
class TextCodec:
    """What the data pipeline needs from a tokenizer.

    encode: raw text -> ids (no special tokens). chat: a user message -> prompt ids ending with
    the assistant turn's start (the chat template with ``add_generation_prompt``); None if the
    tokenizer has no chat template. eos_ids: ids that end a response (the first one separates
    raw documents). pad_id: padding id. special_ids: always kept in a reduced vocabulary.
    """

    encode: Callable[[str], list[int]]
    eos_ids: list[int]
    pad_id: int
    vocab_size: int
    chat: Callable[[str], list[int]] | None = None
    special_ids: list[int] = field(default_factory=list)
    fingerprint: str | None = None


def codec_from_tokenizer(tokenizer: Any, vocab_size: int | None = None) -> TextCodec:
    """`TextCodec` of a transformers tokenizer (SmolLM2's: eos 2 = ``<|im_end|>``, pad 2)."""
    from hierspec.models.draft import tokenizer_fingerprint

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    chat = None
    if getattr(tokenizer, "chat_template", None):

        def chat(text: str) -> list[int]:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return list(ids)

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TextCodec(
        encode=encode,
        eos_ids=[int(eos)],
        pad_id=int(pad),
        vocab_size=int(vocab_size or len(tokenizer)),
        chat=chat,
        special_ids=sorted({int(i) for i in tokenizer.all_special_ids}),
        fingerprint=tokenizer_fingerprint(tokenizer),
    )


# ============================================================================ shard I/O
def _save_rows(path: Path, ids: torch.Tensor, mask: torch.Tensor, meta: dict[str, Any]) -> None:
    write_safetensors(
        path,
        {"ids": ids.to(torch.int32), "mask": mask.to(torch.uint8)},
        {"format": TOKENS_FORMAT, "info": json.dumps(meta)},
    )


def load_rows(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(ids int64 [N, T], mask uint8 [N, T], metadata) of a token shard / eval file."""
    try:
        tensors, meta = read_safetensors(path, what="token shard", expect_format=TOKENS_FORMAT)
    except DraftFileError as err:
        raise DataError(str(err)) from err
    return tensors["ids"].long(), tensors["mask"], meta


def list_shards(data_dir: str | os.PathLike[str]) -> list[Path]:
    """Token shard files of a data directory, sorted by name."""
    return sorted((Path(data_dir) / "tokens").glob("*.safetensors"))


# ============================================================================ generation
def generate_responses(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int],
    temperature: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Responses of the target to token-id prompts, generated in left-padded batches.

    Prompts are batched by length (longest first) and each response is cut after its first
    EOS (kept). temperature 0 = greedy; > 0 = pure sampling (no top-k/top-p) seeded by
    ``seed`` (the global torch RNG is restored afterwards). ``model`` is a transformers causal
    LM or an HFModel.
    """
    from transformers import GenerationConfig

    from hierspec.models.hf import HFModel

    hf = model.model if isinstance(model, HFModel) else model
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    eos = set(int(e) for e in eos_ids)
    gen_kw: dict[str, Any] = {"do_sample": temperature > 0, "pad_token_id": pad_id, "eos_token_id": list(eos)}
    if temperature > 0:
        gen_kw.update(temperature=float(temperature), top_k=0, top_p=1.0)
    with torch.random.fork_rng(devices=[]):
        for b0 in range(0, len(order), batch_size):
            idx = order[b0 : b0 + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = torch.as_tensor(list(prompts[i]), dtype=torch.long)
                ids[r, width - len(p) :] = p
                att[r, width - len(p) :] = 1
            torch.manual_seed(seed * 1_000_003 + b0)
            config = GenerationConfig(max_new_tokens=max_new_tokens, **gen_kw)
            with torch.inference_mode():
                gen = hf.generate(
                    input_ids=ids.to(hf.device), attention_mask=att.to(hf.device), generation_config=config
                )
            for r, i in enumerate(idx):
                resp: list[int] = []
                for tok in gen[r, width:].tolist():
                    resp.append(int(tok))
                    if tok in eos:
                        break
                out[i] = resp
            if progress is not None:
                progress(len(idx))
    return out


def _rows_from_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(pairs), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), seq_len), dtype=torch.uint8)
    for r, (prompt, resp) in enumerate(pairs):
        seq = (list(prompt) + list(resp))[:seq_len]
        n_prompt = min(len(prompt), seq_len)
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, :n_prompt] = 1
        mask[r, n_prompt : len(seq)] = 2
    return ids, mask


def _encode_prompts(items: Sequence[PromptItem], codec: TextCodec, seq_len: int) -> list[list[int]]:
    """Token ids of each prompt; prompts leaving < _MIN_RESPONSE tokens of room are dropped."""
    out = []
    for item in items:
        if item.chat:
            if codec.chat is None:
                raise DataError("chat prompts need a tokenizer with a chat template")
            ids = codec.chat(item.text)
        else:
            ids = codec.encode(item.text)
        if 0 < len(ids) <= seq_len - _MIN_RESPONSE:
            out.append(ids)
    return out


# ============================================================================ the pipeline
@dataclass
class DataConfig:
    """Parameters of a data directory (recorded in manifest.json)."""

    sources: str
    seq_len: int = 256
    shard_rows: int = 128
    gen_max_new_tokens: int = 192
    gen_temperature: float = 0.0
    gen_batch_size: int = 16
    seed: int = 0

    def key(self) -> dict[str, Any]:
        """Everything that changes the shards' contents (gen_batch_size only changes rounding)."""
        d = asdict(self)
        d.pop("gen_batch_size")
        return d


def _check_manifest(data_dir: Path, cfg: DataConfig, codec: TextCodec) -> None:
    path = data_dir / "manifest.json"
    want = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        **cfg.key(),
        "vocab_size": codec.vocab_size,
        "tokenizer": codec.fingerprint,
    }
    if path.is_file():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{path} is unreadable ({err}); delete the data directory to rebuild it") from err
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: directory has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise DataError(
                f"data directory {str(data_dir)!r} was prepared with other parameters ({details}); "
                "use another --data-dir or the same parameters"
            )
    else:
        write_json_atomic(path, want, indent=1)


def _pack_raw(docs: Iterator[str], codec: TextCodec, seq_len: int, limit: int | None, what: str) -> list[int]:
    stream: list[int] = []
    sep = codec.eos_ids[0]
    empty = True
    for doc in docs:
        if not doc.strip():
            continue
        ids = codec.encode(doc)
        if not ids:
            continue
        empty = False
        stream.extend(ids)
        stream.append(sep)
        if limit is not None and len(stream) >= limit:
            break
    if empty:
        raise DataError(f"data source {what} is empty (no text)")
    stream = stream[:limit] if limit is not None else stream
    if len(stream) < seq_len:
        raise DataError(f"data source {what} has {len(stream)} tokens, fewer than one row of {seq_len}")
    return stream


def prepare_data(
    data_dir: str | os.PathLike[str],
    cfg: DataConfig,
    codec: TextCodec,
    target: Any = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish) the token shards of ``data_dir``; returns a summary.

    Raw sources need only the codec; gen sources need the ``target`` (transformers causal LM or
    HFModel) to generate responses. Existing shards are kept (resume); a directory prepared
    with other parameters is refused with `DataError`.
    """
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    sources = parse_sources(cfg.sources)
    _check_manifest(data_dir, cfg, codec)
    tok_dir = data_dir / "tokens"
    tok_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"raw_rows": 0, "gen_rows": 0, "skipped_prompts": 0}

    raw = [s for s in sources if s.kind == "raw"]
    done = tok_dir / "raw.done"
    if raw and not done.is_file():
        rows: list[torch.Tensor] = []
        for s in raw:
            stream = _pack_raw(raw_documents(s), codec, cfg.seq_len, s.limit, str(s))
            n = len(stream) // cfg.seq_len
            rows.append(torch.tensor(stream[: n * cfg.seq_len], dtype=torch.long).view(n, cfg.seq_len))
        all_rows = torch.cat(rows)
        perm = torch.randperm(all_rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        all_rows = all_rows[perm]
        n_shards = 0
        for j, r0 in enumerate(range(0, all_rows.shape[0], cfg.shard_rows)):
            chunk = all_rows[r0 : r0 + cfg.shard_rows]
            _save_rows(
                tok_dir / f"raw-{j:05d}.safetensors",
                chunk,
                torch.ones_like(chunk, dtype=torch.uint8),
                {"source": ",".join(map(str, raw)), "kind": "raw"},
            )
            n_shards += 1
        write_json_atomic(done, {"shards": n_shards, "rows": int(all_rows.shape[0])}, indent=1)
    if raw:
        summary["raw_rows"] = json.loads(done.read_text())["rows"]

    for g, s in enumerate(s for s in sources if s.kind == "gen"):
        stem = f"gen{g}-{s.slug}"  # the index keeps two sources with one file name apart
        if target is None:
            raise DataError(f"source {s} needs the target model to generate responses")
        items = source_prompts(s, "train")
        encoded = _encode_prompts(items, codec, cfg.seq_len)
        summary["skipped_prompts"] += len(items) - len(encoded)
        if not encoded:
            raise DataError(f"every prompt of {s} is too long for seq_len {cfg.seq_len}")
        n_shards = (len(encoded) + cfg.shard_rows - 1) // cfg.shard_rows
        todo = [j for j in range(n_shards) if not (tok_dir / f"{stem}-{j:05d}.safetensors").is_file()]
        bar = tqdm(
            total=sum(len(encoded[j * cfg.shard_rows : (j + 1) * cfg.shard_rows]) for j in todo),
            desc=f"generate {s}",
            unit="prompt",
            disable=not progress,
        )
        for j in todo:
            chunk = encoded[j * cfg.shard_rows : (j + 1) * cfg.shard_rows]
            max_new = min(cfg.gen_max_new_tokens, cfg.seq_len - min(len(p) for p in chunk))
            resp = generate_responses(
                target,
                chunk,
                max_new_tokens=max_new,
                pad_id=codec.pad_id,
                eos_ids=codec.eos_ids,
                temperature=cfg.gen_temperature,
                batch_size=cfg.gen_batch_size,
                seed=cfg.seed + j,
                progress=bar.update,
            )
            ids, mask = _rows_from_pairs(list(zip(chunk, resp, strict=True)), cfg.seq_len, codec.pad_id)
            _save_rows(tok_dir / f"{stem}-{j:05d}.safetensors", ids, mask, {"source": str(s), "kind": "gen"})
        bar.close()
        summary["gen_rows"] += len(encoded)
    return summary


def build_eval_set(
    path: str | os.PathLike[str],
    eval_spec: str,
    codec: TextCodec,
    target: Any,
    *,
    seq_len: int = 256,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out eval rows (built once, then read back): greedy target responses to the reserved
    prompts of ``gen:`` sources (mask 2 on the response), held-out text for ``raw:`` sources.
    """
    path = Path(path)
    if path.is_file():
        ids, mask, meta = load_rows(path)
        info = json.loads(meta.get("info", "{}"))
        if info.get("spec") == eval_spec and ids.shape[1] == seq_len:
            return ids, mask
    pairs: list[tuple[list[int], list[int]]] = []
    raw_rows: list[torch.Tensor] = []
    for s in parse_sources(eval_spec):
        if s.kind == "gen":
            prompts = _encode_prompts(source_prompts(s, "eval"), codec, seq_len)
            if not prompts:
                raise DataError(f"eval source {s}: every prompt is too long for seq_len {seq_len}")
            resp = generate_responses(
                target,
                prompts,
                max_new_tokens=min(max_new_tokens, seq_len - _MIN_RESPONSE),
                pad_id=codec.pad_id,
                eos_ids=codec.eos_ids,
                temperature=0.0,
                batch_size=batch_size,
            )
            pairs.extend(zip(prompts, resp, strict=True))
        else:
            limit = s.limit or 16 * seq_len
            stream = _pack_raw(raw_documents(s, "eval"), codec, seq_len, limit, str(s))
            n = len(stream) // seq_len
            raw_rows.append(torch.tensor(stream[: n * seq_len]).view(n, seq_len))
    parts_ids, parts_mask = [], []
    if pairs:
        i, m = _rows_from_pairs(pairs, seq_len, codec.pad_id)
        parts_ids.append(i)
        parts_mask.append(m)
    for r in raw_rows:
        parts_ids.append(r)
        parts_mask.append(torch.ones_like(r, dtype=torch.uint8))
    ids, mask = torch.cat(parts_ids), torch.cat(parts_mask)
    _save_rows(path, ids, mask, {"spec": eval_spec, "kind": "eval"})
    return ids, mask
