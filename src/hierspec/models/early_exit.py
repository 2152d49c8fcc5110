"""`EarlyExitDraft`: the target's first L decoder layers (frozen, shared) + a small trained head.

LayerSkip-style self-draft: only the head is trained; the embedding, the first ``exit_layer``
decoder layers and the rotary embedding are the target's own modules (``model.model.embed_tokens``,
``model.model.layers[:L]``, ``model.model.rotary_emb``), called the way transformers 5.x Llama
calls them::

    x = embed_tokens(ids); cos_sin = rotary_emb(x, position_ids)
    mask = create_causal_mask(config, x, None, cache, position_ids)
    x = layer(x, attention_mask=mask, position_embeddings=cos_sin, position_ids=...,
              past_key_values=cache, use_cache=True)        for layer in layers[:L]

Works for Llama-layout models (Llama, SmolLM2, Qwen2, Mistral: ``model.model.{embed_tokens,
layers, rotary_emb, norm}``).

Head (`EarlyExitHead`, `hierspec.models.exit_head`): ``[adapter] -> RMSNorm -> LM head``.

KV cache: the draft keeps its OWN config-less ``DynamicCache`` for layers < L (same discipline as
``HFModel``: crop with ``cache.crop(-k)``). Sharing those layers' keys/values and hidden states
with the target (HiSpec) is done by `hierspec.models.layered` (`LayerStack` / `ExitView`, used by
`hierspec.hispec`), which runs this module's `EarlyExitHead` on the buffered hidden states of
the target's own layer ranges; `EarlyExitDraft` is the standalone draft (its own cache).

File format: one safetensors file (see `hierspec.models.draft`), format ``hierspec.early_exit``,
with the head's weights (fp16/bf16), ``vocab_map`` (reduced head), the config and the target's
identity plus a weight signature of the shared layers, so a head trained on one target is
refused on another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hierspec.models.base import ForwardOutput
from hierspec.models.draft import (
    DraftFileError,
    TargetIdentity,
    check_vocab_map,
    load_head_state,
    read_head_file,
    target_identity,
    write_head_file,
)
from hierspec.models.exit_head import (
    _HALF_DTYPES,
    EarlyExitConfig,
    EarlyExitHead,
    _llama_parts,
    exit_logits,
    weight_signature,
)

if TYPE_CHECKING:
    from transformers import DynamicCache

__all__ = [
    "EarlyExitConfig",
    "EarlyExitDraft",
    "EarlyExitHead",
    "exit_logits",
    "load_early_exit",
    "save_early_exit",
    "weight_signature",
]

FORMAT_EARLY_EXIT = "hierspec.early_exit"
_SIGNATURE_RTOL = 2e-2  # bf16 vs fp32 copies of one target differ by ~1e-3 relative


class EarlyExitDraft:
    """Early-exit self-draft as a `LanguageModel` (see module docstring).

    Args:
        target: the target (transformers Llama-layout causal LM, or an ``HFModel`` wrapping one).
            Its modules are shared, never modified; it is put in eval mode.
        head: the trained head; moved to the target's device and dtype.
        max_length: cap on positions (default: the target's max_position_embeddings).

    ``train_logits(ids)`` gives the head's (reduced) logits [B, T, R] with autograd through the
    head only; ``forward`` is the `LanguageModel` view with full-vocabulary logits.
    """

    def __init__(self, target: Any, head: EarlyExitHead, *, max_length: int | None = None) -> None:
        hf, base = _llama_parts(target)
        hf.eval()
        c = head.config
        text_config = hf.config.get_text_config(decoder=True)
        if text_config.num_hidden_layers != c.num_layers or text_config.hidden_size != c.hidden_size:
            raise DraftFileError(
                f"early-exit head made for a target with {c.num_layers} layers x {c.hidden_size} hidden; "
                f"this target has {text_config.num_hidden_layers} x {text_config.hidden_size}"
            )
        self.hf, self.base, self.text_config = hf, base, text_config
        self.exit_layer = c.exit_layer
        self.layers = list(base.layers[: c.exit_layer])
        self.head = head.to(device=hf.device, dtype=hf.dtype)
        self.vocab_size: int = int(hf.get_output_embeddings().weight.shape[0])
        if self.vocab_size != c.vocab_size:
            raise DraftFileError(
                f"early-exit head made for vocabulary {c.vocab_size}, this target has {self.vocab_size}"
            )
        cap = int(text_config.max_position_embeddings)
        self.max_length: int = cap if max_length is None else min(int(max_length), cap)
        self.cache: DynamicCache = self._new_cache()
        self._length = 0
        self._batch: int | None = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    @property
    def cache_length(self) -> int:
        return self._length

    @property
    def vocab_map(self) -> torch.Tensor | None:
        return self.head.vocab_map

    @staticmethod
    def _new_cache() -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache()

    # ------------------------------------------------------------------ layers + head
    def exit_hidden(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None
    ) -> torch.Tensor:
        """Residual stream after layer L (before any norm) for ``ids`` at ``positions`` [B, T]."""
        from transformers.masking_utils import create_causal_mask

        x = self.base.embed_tokens(ids)
        pos_emb = self.base.rotary_emb(x, position_ids=positions)
        mask = create_causal_mask(
            config=self.text_config,
            inputs_embeds=x,
            attention_mask=None,
            past_key_values=cache,
            position_ids=positions,
        )
        for layer in self.layers:
            x = layer(
                x,
                attention_mask=mask,
                position_embeddings=pos_emb,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return x

    def head_logits(self, exit_hidden: torch.Tensor, *, full: bool = True) -> torch.Tensor:
        """Head on a layer-L residual stream [.., H] (e.g. the target's ``hidden_states[L]``).

        full=True: [.., V] logits, -inf outside vocab_map; full=False: [.., R] reduced logits.
        """
        return exit_logits(self.head, exit_hidden, self.hf.get_output_embeddings().weight, full=full)

    def train_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Head logits [B, T, R] (R = V for a tied head) at positions 0..T-1; grads reach the head only."""
        ids = input_ids.to(self.device)
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        with torch.no_grad():
            h = self.exit_hidden(ids, positions, None)
        return self.head_logits(h, full=False)

    # ------------------------------------------------------------------ LanguageModel
    def _check_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [B, T], got shape {tuple(input_ids.shape)}")
        batch, new = input_ids.shape
        if self._length > 0 and batch != self._batch:
            raise ValueError(f"batch size {batch} differs from the cached batch {self._batch}; reset() first")
        if self._length + new > self.max_length:
            raise ValueError(
                f"forward of {new} tokens at cache_length {self._length} exceeds max_length {self.max_length}"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        return input_ids.to(device=self.device, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor, *, output_hidden: bool = False) -> ForwardOutput:
        """Run ``input_ids`` [B, T] at positions cache_length.. through layers < L and the head.

        Returns full-vocabulary logits [B, T, V] (float32; float64 for float64 targets), -inf
        outside vocab_map for a reduced head; ``hidden`` is the head's normed hidden state.
        """
        ids = self._check_input(input_ids)
        start, new = self._length, ids.shape[1]
        positions = torch.arange(start, start + new, device=ids.device)[None].expand(ids.shape[0], -1)
        try:
            with torch.inference_mode():
                h = self.exit_hidden(ids, positions, self.cache)
                logits = self.head_logits(h)
                normed = self.head.hidden(h) if output_hidden else None
        except BaseException:
            self._rollback_layers(start)
            raise
        self._length = start + new
        self._batch = ids.shape[0]
        logits = logits.float() if logits.dtype in _HALF_DTYPES else logits.clone()
        return ForwardOutput(logits=logits, hidden=None if normed is None else normed.clone())

    __call__ = forward

    def _rollback_layers(self, length: int) -> None:
        with torch.inference_mode():
            for layer in self.cache.layers:
                extra = layer.get_seq_length() - length
                if extra > 0:
                    layer.crop(-extra)

    def crop(self, length: int) -> None:
        """Drop every cached position >= length (0 <= length <= cache_length)."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(f"crop length must be an int, got {type(length).__name__}")
        if not 0 <= length <= self._length:
            raise ValueError(f"crop length must be in 0..{self._length}, got {length}")
        if length == self._length:
            return
        if length == 0:
            self.reset()
            return
        with torch.inference_mode():
            self.cache.crop(-(self._length - length))
        self._length = length

    def reset(self) -> None:
        self.cache = self._new_cache()
        self._length = 0
        self._batch = None

    def __repr__(self) -> str:
        c = self.head.config
        return (
            f"EarlyExitDraft(exit_layer={c.exit_layer}/{c.num_layers}, head={c.head}, "
            f"R={c.n_vocab or c.vocab_size}, adapter={c.adapter_dim}, cache_length={self._length})"
        )

    # ------------------------------------------------------------------ save
    def save(
        self,
        path: str | os.PathLike[str],
        target: TargetIdentity | None = None,
        *,
        dtype: torch.dtype = torch.float16,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        save_early_exit(self, path, target, dtype=dtype, extra=extra)


def build_early_exit(
    target: Any,
    exit_layer: int,
    *,
    vocab_map: torch.Tensor | None = None,
    adapter_dim: int = 0,
    max_length: int | None = None,
) -> EarlyExitDraft:
    """A fresh `EarlyExitDraft` on ``target``: reduced head if ``vocab_map`` is given, else tied.

    The head starts as the untrained early exit: the target's final norm and LM-head rows, and a
    zero adapter. Head parameters are float32 masters when the target is float32.
    """
    hf, _ = _llama_parts(target)
    tc = hf.config.get_text_config(decoder=True)
    vocab = int(hf.get_output_embeddings().weight.shape[0])
    config = EarlyExitConfig(
        exit_layer=exit_layer,
        vocab_size=vocab,
        hidden_size=int(tc.hidden_size),
        num_layers=int(tc.num_hidden_layers),
        head="reduced" if vocab_map is not None else "tied",
        n_vocab=int(vocab_map.numel()) if vocab_map is not None else None,
        adapter_dim=adapter_dim,
        norm_eps=float(getattr(tc, "rms_norm_eps", 1e-5)),
    )
    head = EarlyExitHead(config, vocab_map)
    head.init_from_target(hf)
    return EarlyExitDraft(hf, head, max_length=max_length)


def save_early_exit(
    draft: EarlyExitDraft,
    path: str | os.PathLike[str],
    target: TargetIdentity | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the head as one safetensors file (weights fp16/bf16, vocab_map, config, identity).

    ``target`` defaults to `target_identity(draft.hf)` (no tokenizer fingerprint); pass
    ``target_identity(model, tokenizer)`` to record the tokenizer too.
    """
    target = target or target_identity(draft.hf)
    signature = weight_signature(draft.hf, draft.exit_layer)
    write_head_file(
        path, FORMAT_EARLY_EXIT, draft.head, draft.head.config, target, signature, dtype=dtype, extra=extra
    )


def load_early_exit(
    path: str | os.PathLike[str],
    target: Any,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    check_signature: bool = True,
) -> EarlyExitDraft:
    """Load a head written by `save_early_exit` onto ``target`` (transformers model or HFModel).

    Refuses (`DraftFileError`) a missing / truncated / corrupt file, a target of another
    vocabulary size, hidden size or depth, another tokenizer (when ``tokenizer`` is given and
    the file recorded one), other weights in the shared layers (signature check), and a
    vocab_map with ids outside the target vocabulary.
    """
    tensors, config, recorded, sig, what = read_head_file(
        path, FORMAT_EARLY_EXIT, "early-exit file", EarlyExitConfig
    )
    actual = target_identity(target, tokenizer)
    recorded.check(actual, what=what, strict_shape=True)
    if config.exit_layer > actual.num_layers:
        raise DraftFileError(
            f"{what}: exit layer {config.exit_layer} > the target's {actual.num_layers} layers"
        )
    if check_signature:
        try:
            sig = [float(x) for x in sig]
        except (TypeError, ValueError) as err:
            raise DraftFileError(f"{what} has no valid weight signature") from err
        mine = weight_signature(target, config.exit_layer)
        if len(sig) != len(mine) or any(
            abs(a - b) > _SIGNATURE_RTOL * max(abs(a), abs(b), 1e-12) for a, b in zip(sig, mine, strict=True)
        ):
            raise DraftFileError(
                f"{what} was trained on other target weights (the signature of the shared layers "
                "differs); retrain the head for this target"
            )
    vocab_map = None
    if config.head == "reduced":
        if "vocab_map" not in tensors:
            raise DraftFileError(f"{what} has no vocab_map tensor")
        vocab_map = check_vocab_map(tensors.pop("vocab_map"), config.vocab_size, what=f"{what}: vocab_map")
    try:
        head = EarlyExitHead(config, vocab_map)
    except ValueError as err:
        raise DraftFileError(f"{what}: {err}") from err
    load_head_state(head, tensors, what)
    return EarlyExitDraft(target, head, max_length=max_length)
