"""Text-level drafts from a draft model with another tokenizer (universal assisted decoding,
made exact).

A draft model from another family can propose neither target token ids nor a q row over them,
but it can propose text::

    s = decode_T(context)                          the committed context, as text
    d = greedy draft of the draft model on encode_D(s)          d_1..d_m, draft tokens
    D = decode_D(d)                                the draft text
    X = the target tokens of encode_T(s + D) that extend the context

X is a *deterministic* draft (``probs=None``: q one-hot at X), a function of the context alone,
and every rule verifies a deterministic draft exactly (`hierspec.verify.coupled`): token-identical
to greedy decoding at temperature 0, distributed as the target at T > 0, whatever X is. Nothing
here can bias the output; it only decides how much of it gets accepted. (A sampled draft would
need its q in the target's token space: the law of a re-tokenized sampled text, intractable.)

Boundaries (target side). The text of the last ``lookbehind`` committed tokens, ``head``, is
re-tokenized together with D: X = encode_T(head + D) minus the committed tokens it starts with.
If it does not start with them (D re-spells a committed token: "hel" + "lo" -> "hello"), D is
spelled on its own, X = encode_T(D), kept only if the context followed by X decodes to s + D;
else the draft is empty. A context that ends inside a character (a byte-level token holding part
of its UTF-8 bytes) is drafted from its last whole character; X then starts by re-spelling the
committed partial tokens, which the lookbehind check requires. The last target token of the
re-tokenization is proposed only once another follows it (the draft text may stop mid-word),
unless the draft ended on a special token (its EOS): a draft of k tokens drafts text until
encode_T gives k + 1.

Draft state. The draft model's context is encode_D(s), kept incrementally: ``anchors`` (i, j)
record that ids[:i] and draft[:j] spell the same text, a word followed by a space, where both
put a token boundary (from the offsets of a re-tokenization). Pre-tokenizers (GPT-2's regex and
its descendants, SentencePiece's word pieces) split before such a space whatever follows, so the
draft's split there is the canonical one and its context equals a fresh encoding of s. Each step
re-encodes the text after the last anchor at least ``lookbehind`` tokens back; `sync_cache` rolls
the draft's cache back to the common prefix. A tokenizer whose encoding of a piece depends on
what precedes it (SentencePiece's prefix space, seen by `Codec.seam_safe`) is re-encoded from the
start every step instead: correct, slower. The draft's own BOS (`Codec.start`) opens its context.

Confidence (for `hierspec.policy`): with c_t the draft's softmax maximum at draft token t (of
its processed row at T > 0) and [a_j, b_j) the characters of X_j in D, X_j gets the product of
c_t over the draft tokens that start in [b_{j-1}, b_j) (b_0 = -inf): the products telescope to
the draft's confidence in the text up to b_j. ``stop(confidences)`` (as `ModelDrafter`) is
asked each time the draft completes another target token; any prefix of a deterministic draft
may be kept, so every rule stays exact. A tokenizer without offsets (no fast backend) gives each
target token an equal, geometric share of the draft's confidence in its whole text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.base import LanguageModel
from ..sampling import SamplingParams, process_logits
from .base import Draft, check_context, sync_cache

__all__ = ["Codec", "TextDrafter", "load_tokenizer", "same_vocabulary", "text_drafter"]

StopFn = Callable[[Sequence[float]], bool]
_PARTIAL = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives
_CONTEXT = 4  # tokens decoded before a slice, so its first token is spelled as in context
_SEAM_PROBES = (("Hello", " world"), ("x", "y"), ("def f", "(x):\n    return x"), ("a", "\u00e9t\u00e9"))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _boundaries(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(k, offset) for each k whose first k tokens end on a boundary: token k (0-based) starts at
    or after token k - 1's end (a byte-level character split over several tokens gives
    overlapping offsets: no boundary inside it). The end of the last token is not one."""
    return [(k, offsets[k - 1][1]) for k in range(1, len(offsets)) if offsets[k][0] >= offsets[k - 1][1]]


class Codec:
    """A tokenizer seen as text <-> ids: a transformers tokenizer (its fast backend when it has
    one) or a `tokenizers.Tokenizer`. Decoding keeps special tokens and never cleans up spaces;
    encoding adds no special tokens."""

    def __init__(self, tokenizer: Any, name: str = "tokenizer") -> None:
        fast = getattr(tokenizer, "backend_tokenizer", None)
        if fast is None and hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab"):
            fast = tokenizer  # a tokenizers.Tokenizer
        if fast is None and not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
            raise ValueError(
                f"{name}: expected a transformers tokenizer or a tokenizers.Tokenizer, "
                f"got {type(tokenizer).__name__}"
            )
        self.tokenizer, self._fast = tokenizer, fast
        if fast is not None:
            added = fast.get_added_tokens_decoder()
            self.special = {i for i, t in added.items() if getattr(t, "special", False)}
            with_, without = fast.encode("a").ids, fast.encode("a", add_special_tokens=False).ids
        else:
            self.special = set(getattr(tokenizer, "all_special_ids", ()))
            with_, without = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
        # the special tokens an encoding starts with (a BOS), for the draft model's context
        k = next((k for k in range(len(with_)) if with_[k : k + len(without)] == without), 0)
        self.start = list(with_[:k])
        self.seam_safe = all(self.decode(self.encode(u) + self.encode(v)) == u + v for u, v in _SEAM_PROBES)

    @property
    def has_offsets(self) -> bool:
        return self._fast is not None

    def encode(self, text: str) -> list[int]:
        return self.encode_offsets(text)[0]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Ids of ``text`` and each token's character span (None without a fast backend)."""
        if self._fast is None:
            return list(self.tokenizer.encode(text, add_special_tokens=False)), None
        enc = self._fast.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids: Sequence[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=False)
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def text(self, ids: Sequence[int], a: int, b: int) -> str:
        """The text of ids[a:b] as it reads inside ``ids`` (a few tokens before ``a`` are decoded
        with it, so a leading space or prefix rule applies as in context). ``a`` must be a
        character boundary (`clean`)."""
        ctx = self.decode(ids[max(0, a - _CONTEXT) : a])
        return self.decode(ids[max(0, a - _CONTEXT) : b])[len(ctx) :]

    def clean(self, ids: Sequence[int], j: int) -> int:
        """The largest i <= j (at most 8 tokens back) such that ids[:i] ends on a whole
        character; j itself when none does (a text with real U+FFFD characters)."""
        for i in range(j, max(j - 8, 0) - 1, -1):
            if i == 0 or not self.decode(ids[max(0, i - _CONTEXT) : i]).endswith(_PARTIAL):
                return i
        return j


def _vocab(tokenizer: Any) -> dict[str, int]:
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None:
        return fast.get_vocab(with_added_tokens=True)
    if hasattr(tokenizer, "encode_batch"):  # a tokenizers.Tokenizer
        return tokenizer.get_vocab(with_added_tokens=True)
    return dict(tokenizer.get_vocab())


def same_vocabulary(target_tokenizer: Any, draft_tokenizer: Any) -> bool:
    """True iff both tokenizers map the same token strings to the same ids (added and special
    tokens included). That is exactly what token-level drafting needs -- a draft id must mean
    the target's token -- whatever the merges or normalisers. Sizes first (free), then the
    two vocabularies (~0.2 s for 151k tokens)."""
    if target_tokenizer is draft_tokenizer:
        return True
    if _size(target_tokenizer) != _size(draft_tokenizer):  # the cheap test first
        return False
    return _vocab(target_tokenizer) == _vocab(draft_tokenizer)


def _size(tokenizer: Any) -> int:
    """Number of tokens, added ones included."""
    if hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.get_vocab_size(with_added_tokens=True)
    return len(tokenizer)


class TextDrafter:
    """Deterministic drafts of target tokens from a draft model with another tokenizer (see the
    module docstring). ``lookbehind``: committed target tokens re-tokenized each step (>= 1);
    ``max_ratio``: at most ``max_ratio * k + 2`` draft tokens for a draft of k target tokens."""

    vocab_size = None  # proposes target ids from the target's tokenizer: checked by the engine's
    # own bound on token ids, not by a vocabulary size of its own
    stoppable = True  # `propose` takes ``stop`` (`hierspec.drafters.base.StoppableDrafter`)

    def __init__(
        self,
        draft_model: LanguageModel,
        draft_tokenizer: Any,
        target_tokenizer: Any,
        *,
        lookbehind: int = 8,
        max_ratio: int = 4,
    ) -> None:
        if isinstance(lookbehind, bool) or not isinstance(lookbehind, int) or lookbehind < 1:
            raise ValueError(f"lookbehind: expected an integer >= 1 (target tokens), got {lookbehind!r}")
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, int) or max_ratio < 1:
            raise ValueError(f"max_ratio: expected an integer >= 1, got {max_ratio!r}")
        if not isinstance(draft_model, LanguageModel):
            raise ValueError(f"draft_model: expected a LanguageModel, got {type(draft_model).__name__}")
        self.model = draft_model
        self.draft = Codec(draft_tokenizer, "draft_tokenizer")
        self.target = Codec(target_tokenizer, "target_tokenizer")
        self.lookbehind, self.max_ratio = lookbehind, max_ratio
        self._incremental = self.draft.seam_safe and self.target.seam_safe
        self._specials: dict[int, str | None] = {}  # draft special id -> its text if the target has it
        self.reset()

    def reset(self) -> None:
        self.model.reset()
        self._fed: list[int] = []  # draft tokens in the draft model's cache
        self._ids: list[int] = []  # the target context of the last call
        self._dids: list[int] = list(self.draft.start)  # encode_D(text of self._ids)
        self._anchors: list[tuple[int, int]] = [(0, len(self._dids))]

    # ------------------------------------------------------------------ the draft's context
    def _draft_context(self, ids: list[int], end: int) -> list[int]:
        """encode_D of the text of ids[:end] (``end`` a character boundary), re-encoding only
        the text after the last anchor at least `lookbehind` tokens back (module docstring)."""
        limit = min(_common(ids, self._ids), end - self.lookbehind) if self._incremental else 0
        anchors = self._anchors
        while len(anchors) > 1 and anchors[-1][0] > limit:
            anchors.pop()
        ti, dj = anchors[-1]
        tail = self.target.text(ids, ti, end)
        e, d_off = self.draft.encode_offsets(tail)
        start = self.draft.start
        if ti == 0 and start and e[: len(start)] == start:  # the text opens with the draft's BOS
            dj = 0  # (the target's BOS spelled as the draft's): not twice
        dids = self._dids[:dj] + e
        found = False
        if self._incremental and d_off is not None:
            t_ids, t_off = self.target.encode_offsets(tail)
            n = _common(t_ids, ids[ti:end])  # boundaries among the committed tokens it re-spells
            t_at = {b: k for k, b in _boundaries(t_off[:n])}
            for m, b in _boundaries(d_off):
                if b in t_at and tail[b].isspace() and not tail[b - 1].isspace():
                    anchors.append((ti + t_at[b], dj + m))
                    found = True
            if not found and end - ti > 32 * self.lookbehind:  # bound the next re-encoding anyway
                anchors.append((end, len(dids)))
        self._ids, self._dids = ids, dids
        return dids

    # ------------------------------------------------------------------ re-tokenization
    def _extension(self, ids: list[int], a: int, head: str, text: str) -> tuple[list[int], list[int] | None]:
        """Target tokens that extend ``ids`` by ``text`` (spoken after ``head``, the text of
        ids[a:] up to its last whole character), and each one's end offset in ``text``."""
        full, off = self.target.encode_offsets(head + text)
        n = len(ids) - a
        if full[:n] == ids[a:]:
            return full[n:], None if off is None else [e - len(head) for _, e in off[n:]]
        alone, off = self.target.encode_offsets(text)
        if alone and self.target.text(ids + alone, a, len(ids) + len(alone)) == head + text:
            return alone, None if off is None else [e for _, e in off]
        return [], None

    def _special_text(self, token: int) -> str | None:
        """The text of a draft special token if the target encodes it as one special token."""
        if token not in self._specials:
            s = self.draft.decode([token])
            t = self.target.encode(s)
            self._specials[token] = s if len(t) == 1 and t[0] in self.target.special else None
        return self._specials[token]

    # ------------------------------------------------------------------ proposing
    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        *,
        stop: StopFn | None = None,
    ) -> Draft:
        """Up to ``num_tokens`` target tokens after ``context`` [1, L], drafted greedily in the
        draft's space whatever ``params`` (deterministic; ``generator`` is not read). At T > 0
        the confidences are maxima of the draft's processed rows (``params``)."""
        del generator
        sampled = params is not None and not params.greedy
        check_context(context)
        ids = context[0].tolist()
        if num_tokens <= 0:
            return Draft.empty(1, context.device)
        end = self.target.clean(ids, len(ids))
        dctx = self._draft_context(ids, end)
        cap = min(self.max_ratio * num_tokens + 2, self.model.max_length - len(dctx))
        if cap <= 0 or not dctx:
            return Draft.empty(1, context.device)
        a = min(self.target.clean(ids, max(0, len(ids) - self.lookbehind)), end) if self._incremental else 0
        head = self.target.text(ids, a, end)
        before = dctx[-_CONTEXT:]
        base = self.draft.decode(before)
        fed = torch.tensor(self._fed, dtype=torch.long)
        logits = sync_cache(self.model, fed, torch.tensor(dctx, dtype=torch.long), len(dctx)).logits[0, -1]
        self._fed = list(dctx)
        drafted: list[int] = []
        conf: list[float] = []  # c_t of draft token t
        starts: list[int] = []  # where draft token t starts in the draft text
        text, ext, ends = "", [], None
        final = False  # the draft ended on a special token the target has: its text is complete
        asked = 0  # complete target tokens `stop` was asked about
        stopped = False
        for t in range(cap):
            x = int(logits.argmax())
            row = process_logits(logits[None], params)[0] if sampled else torch.softmax(logits.double(), -1)
            conf.append(float(row[x]))
            starts.append(len(text))
            if x in self.draft.special:
                s = self._special_text(x)
                if s is not None:
                    text, final = text + s, True
                    ext, ends = self._extension(ids, a, head, text)
                break
            drafted.append(x)
            new = self.draft.decode(before + drafted)[len(base) :].rstrip(_PARTIAL)
            if new != text:
                text = new
                ext, ends = self._extension(ids, a, head, text)
            if len(ext) > num_tokens:
                break
            if stop is not None and len(ext) - 1 > asked:
                asked = len(ext) - 1
                if stop(self._confidences(ends, conf, starts, ext, asked)):
                    stopped = True
                    break
            if t + 1 < cap:
                logits = self.model.forward(torch.tensor([[x]], device=self.model.device)).logits[0, -1]
                self._fed.append(x)
        k = asked if stopped else min(num_tokens, len(ext) if final else len(ext) - 1)
        if k <= 0:
            return Draft.empty(1, context.device)
        out = torch.tensor([ext[:k]], dtype=torch.long, device=context.device)
        c = self._confidences(ends, conf, starts, ext, k)
        return Draft(out, None, torch.tensor(c, dtype=torch.float32))

    @staticmethod
    def _confidences(
        ends: list[int] | None, conf: list[float], starts: list[int], ext: list[int], k: int
    ) -> list[float]:
        """Confidence of the first k target tokens ``ext`` (module docstring); without offsets
        each gets an equal share (geometric) of the draft's confidence in its whole text."""
        if ends is None:
            share = math.prod(conf) ** (1.0 / max(len(ext), 1))
            return [share] * k
        out, lo = [], -math.inf
        for j in range(k):
            p = math.prod(c for c, s in zip(conf, starts, strict=True) if lo <= s < ends[j])
            out.append(min(max(p, 0.0), 1.0))
            lo = ends[j]
        return out


# ---------------------------------------------------------------------------------- factory
def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer of a draft: a GGUF file (from its metadata, cached:
    `hierspec.models.open.load_gguf_tokenizer`) or a transformers directory (local files only)."""
    p = Path(path)
    if p.suffix == ".gguf":
        from ..models.open import load_gguf_tokenizer

        return load_gguf_tokenizer(p)
    if p.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    raise ValueError(
        f"draft {os.fspath(path)!r}: no tokenizer (expected a .gguf file or a transformers folder)"
    )


def _pair(x: Any, name: str) -> tuple[Any, Any]:
    if hasattr(x, "model") and hasattr(x, "tokenizer"):  # hierspec.models.open.Opened
        return x.model, x.tokenizer
    if isinstance(x, tuple) and len(x) == 2:
        return x
    raise ValueError(f"{name}: expected (model, tokenizer) or an opened model, got {type(x).__name__}")


def text_drafter(
    target: Any, draft: Any, *, model_kwargs: dict | None = None, **kwargs: Any
) -> tuple[Any, str]:
    """The drafter for ``draft`` proposing to ``target`` (each a (LanguageModel, tokenizer) pair
    or a `hierspec.models.open.Opened`), and a one-line note saying which kind it is:
    same vocabulary (and model vocabulary size): token-level drafts, ``ModelDrafter(model,
    **model_kwargs)``; otherwise: text-level drafts, ``TextDrafter(..., **kwargs)`` (greedy,
    deterministic at every temperature)."""
    from .model import ModelDrafter

    t_model, t_tok = _pair(target, "target")
    d_model, d_tok = _pair(draft, "draft")
    if t_tok is None or d_tok is None:
        raise ValueError("text_drafter: both tokenizers are needed to compare vocabularies")
    if same_vocabulary(t_tok, d_tok) and d_model.vocab_size == t_model.vocab_size:
        return ModelDrafter(d_model, **(model_kwargs or {})), "same vocabulary: token-level drafts"
    return TextDrafter(d_model, d_tok, t_tok, **kwargs), (
        "the draft has another vocabulary: text-level drafts (its greedy text re-tokenized for the "
        "target; exact: deterministic drafts)"
    )
