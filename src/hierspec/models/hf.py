"""`HFModel`: a transformers causal LM behind the `LanguageModel` protocol.

Wraps any ``AutoModelForCausalLM`` with plain softmax attention (Llama, Qwen2, Mistral, GPT-2,
Gemma, GGUF-loaded Llama, ...) and owns one ``transformers.DynamicCache`` for one batch.

Invariant (the one of ``hierspec.models.base``)::

    cache_length == number of positions held by the DynamicCache, for every layer
    forward(ids[B, T]) runs ids at positions cache_length .. cache_length+T-1 (explicit
    position_ids) and appends them; crop(n) keeps positions 0..n-1 and the state then equals a
    fresh prefill of those n tokens (up to float rounding of differently shaped matmuls)
    forward_tree(ids[1, N], parents) runs a draft tree in one forward (node i at position
    cache_length + depth(i), tree mask of ``hierspec.models.treemask``) and appends the N nodes in
    node order; compact(start, keep) then keeps positions 0..start-1 and start + keep[j]

The cache is built *without* the model config, so every layer is a full ``DynamicLayer``: sliding-
window layers (Mistral, Gemma) keep all positions too and the mask code applies the window over
absolute positions. That costs memory O(sequence) on those layers but makes ``crop`` exact to any
length. Models whose layers are not plain KV attention (linear attention / SSM hybrids, KV
sharing) are not supported.

Device: the model's device (``device=`` of `from_pretrained`, or wherever the module lives) is
``self.device``; ids, positions and tree masks are created there and logits/hidden states are
returned there.

Compilation (``compile=``, OFF by default): the decode and verify forwards go through
``torch.compile(model, dynamic=True)``. It is meant for CUDA, where a small model is bound by kernel
launches; on a 2-vCPU AMD EPYC (AVX-512 BF16) ``torch.compile`` made a SmolLM2-135M bf16 forward
at T = 1 slower (61.5 ms vs 44.7 ms: the matmul kernels, not Python overhead, set the CPU cost), so
keep it off there. The first calls compile (minutes for inductor;
a few graphs: prefill, T = 1, T > 1, tree masks) and later calls reuse them. CUDA graphs
(``mode="reduce-overhead"``) are not used: they need fixed buffer addresses, i.e. a preallocated
cache (transformers' ``StaticCache``), and transformers 5.23's ``StaticLayer`` has no ``crop``.
Rolling it back would be an in-place ``cumulative_length.fill_(n)`` (stale slots >= n are hidden by
the causal mask and overwritten by the next forward) and ``compact`` an in-place ``index_copy_``,
but the tree masks would have to span ``max_cache_len`` and none of it can be measured without a
GPU, so this adapter keeps the exact, croppable DynamicCache and compiles without CUDA graphs.

transformers is imported lazily (inside functions), so ``import hierspec.models`` works without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hierspec.models.base import ForwardOutput
from hierspec.models.treemask import check_compact, check_parents, tree_attention_mask, tree_depths

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _new_cache() -> DynamicCache:
    """An empty config-less DynamicCache (all layers full attention, croppable anywhere)."""
    from transformers import DynamicCache

    return DynamicCache()


def _config_max_length(config: Any) -> int:
    """Longest position the model was built for: max_position_embeddings, n_positions, ..."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        "cannot find the model's maximum length in its config "
        "(max_position_embeddings / n_positions); pass max_length= explicitly"
    )


class HFModel:
    """A transformers causal LM with a position-addressed KV cache (see module docstring).

    Args:
        model: a loaded causal LM (``AutoModelForCausalLM``); put in eval mode, weights untouched.
        max_length: cap on positions; defaults to ``config.max_position_embeddings`` (or
            ``n_positions``) and may not exceed it.
        check_ids: check every forward that ids lie in ``[0, vocab_size)`` (one host sync).
        compile: False (default: eager), True (``torch.compile(model, dynamic=True)``), or a mapping
            of ``torch.compile`` keyword arguments (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``,
            ``{"backend": "eager"}`` to check tracing only); see module docstring. For CUDA.

    Returned logits are float32 (float64 for a float64 model; fp16/bf16 logits are upcast) and are
    ordinary tensors, not inference tensors, so callers may modify them in place.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_length: int | None = None,
        check_ids: bool = True,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        model.eval()
        self.model = model
        self._model_fn = _compiled(model, compile)
        config = model.config.get_text_config(decoder=True)
        self.config = config
        out_emb = model.get_output_embeddings()
        weight = getattr(out_emb, "weight", None)
        # vocab_size is the logits width (rows of lm_head; equals config.vocab_size normally).
        width = weight.shape[0] if weight is not None else config.vocab_size
        self.vocab_size: int = int(width)
        config_max = _config_max_length(config)
        if max_length is None:
            max_length = config_max
        elif not 0 < max_length <= config_max:
            raise ValueError(f"max_length must be in 1..{config_max}, got {max_length}")
        self.max_length: int = int(max_length)
        self.check_ids = check_ids
        self._cache = _new_cache()
        self._length = 0
        self._batch: int | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_dir: str | os.PathLike[str],
        *,
        gguf_file: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        compile: bool | Mapping[str, Any] = False,
        **kw: Any,
    ) -> HFModel:
        """Load ``AutoModelForCausalLM.from_pretrained(path_or_dir, gguf_file=..., dtype=...)`` and
        move it to ``device``.

        ``kw`` goes to transformers' ``from_pretrained`` (e.g. ``attn_implementation``); ``compile``
        to `HFModel`.
        """
        from transformers import AutoModelForCausalLM

        if gguf_file is not None:
            kw["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(os.fspath(path_or_dir), dtype=dtype, **kw)
        if device is not None:
            model = model.to(device)
        return cls(model, max_length=max_length, compile=compile)

    # ------------------------------------------------------------------ protocol properties
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cache_length(self) -> int:
        """Number of positions currently held in the KV cache."""
        return self._length

    @property
    def cache(self) -> DynamicCache:
        """The underlying DynamicCache (read-only use; mutate only through forward/crop/reset)."""
        return self._cache

    # ------------------------------------------------------------------ protocol methods
    def _check_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch, new = input_ids.shape
        if batch == 0 or new == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        if self._length > 0 and batch != self._batch:
            raise ValueError(f"batch size {batch} differs from the cached batch {self._batch}; reset() first")
        if self._length + new > self.max_length:
            raise ValueError(
                f"forward of {new} tokens at cache_length {self._length} exceeds max_length {self.max_length}"
            )
        if self.check_ids and input_ids.device.type == "cpu":  # ids on an accelerator come from the
            # library's own argmax / sampling over this vocabulary: checking them would sync per token
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        return input_ids.to(device=self.device, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor, *, output_hidden: bool = False) -> ForwardOutput:
        """Run ``input_ids`` [B, T] at positions cache_length.. and append them to the cache.

        Returns logits [B, T, V] (float32, or float64 for float64 models) and, if
        ``output_hidden``, the last hidden states [B, T, H] after the final norm (model dtype).
        On an exception the cache is rolled back to its previous length.
        """
        ids = self._check_input(input_ids)
        start, new = self._length, ids.shape[1]
        positions = torch.arange(start, start + new, device=ids.device).unsqueeze(0)
        return self._run(ids, positions.expand(ids.shape[0], -1), None, output_hidden)

    def _run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor] | None,
        output_hidden: bool,
    ) -> ForwardOutput:
        """One model call appending ``ids`` [B, T] to the cache (rolled back on an exception)."""
        start, new = self._length, ids.shape[1]
        try:
            with torch.inference_mode():
                out = self._model_fn(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=self._cache,
                    use_cache=True,
                    output_hidden_states=output_hidden,
                    return_dict=True,
                )
        except BaseException:
            self._rollback_layers(start)
            raise
        self._length = start + new
        self._batch = ids.shape[0]
        logits = out.logits
        # Outside inference mode: these ops make ordinary tensors the caller may edit in place.
        logits = logits.float() if logits.dtype in _HALF_DTYPES else logits.clone()
        hidden = out.hidden_states[-1].clone() if output_hidden else None
        return ForwardOutput(logits=logits, hidden=hidden)

    __call__ = forward

    # ------------------------------------------------------------------ tree verification
    def _attn_implementation(self) -> str | None:
        impl = getattr(self.config, "_attn_implementation", None)
        return impl if impl is not None else getattr(self.model.config, "_attn_implementation", None)

    @property
    def tree_attention(self) -> bool:
        """Whether `forward_tree` can run on this model (see `hierspec.models.base.TreeModel`)."""
        return self.tree_attention_reason is None

    @property
    def tree_attention_reason(self) -> str | None:
        """Why `forward_tree` cannot run on this model, or None if it can."""
        impl = self._attn_implementation()
        if impl not in ("sdpa", "eager"):
            return (
                f"its attention implementation {impl!r} takes no tree mask; load it with "
                "attn_implementation='sdpa' or 'eager'"
            )
        window = getattr(self.config, "sliding_window", None)
        for kind in set(getattr(self.config, "layer_types", None) or ()):
            if kind != "full_attention" and not (kind == "sliding_attention" and isinstance(window, int)):
                return f"it has {kind!r} layers, which take no tree mask"
        return None

    def _tree_attention_mask(
        self, parents: torch.Tensor, past: int
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The 4D mask [1, 1, N, past+N] the model's attention takes as-is (transformers 5 returns
        a 4D ``attention_mask`` from ``create_causal_mask`` unchanged): boolean (True = attend) for
        sdpa, additive 0 / finfo.min in the model dtype for eager. Sliding-window layers get the
        window applied over absolute positions (prefix j at j, node k at past + depth(k)); models
        with per-layer types (Qwen2, Gemma) get the dict {layer_type: mask} they accept."""
        impl = self._attn_implementation()
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"forward_tree supports sdpa and eager attention, the model uses {impl!r}")
        allowed = tree_attention_mask(parents, past).to(self.device)
        depth = tree_depths(parents).to(self.device)
        window = getattr(self.config, "sliding_window", None)

        def windowed() -> torch.Tensor:
            key_pos = torch.cat([torch.arange(past, device=self.device), past + depth])
            return allowed & ((past + depth)[:, None] - key_pos[None, :] < int(window))

        def as_4d(mask: torch.Tensor) -> torch.Tensor:
            mask = mask[None, None]
            if impl == "eager":
                zero = torch.zeros((), dtype=self.dtype, device=self.device)
                mask = torch.where(mask, zero, torch.finfo(self.dtype).min)
            return mask

        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            kinds = set(layer_types)
            if kinds <= {"full_attention"}:
                return as_4d(allowed)
            masks = {}
            for kind in kinds:
                if kind == "full_attention":
                    masks[kind] = as_4d(allowed)
                elif kind == "sliding_attention" and isinstance(window, int):
                    masks[kind] = as_4d(windowed())
                else:
                    raise ValueError(f"forward_tree does not support {kind!r} layers")
            return masks
        return as_4d(windowed() if isinstance(window, int) else allowed)

    def forward_tree(
        self, input_ids: torch.Tensor, parents: torch.Tensor | Sequence[int], *, output_hidden: bool = False
    ) -> ForwardOutput:
        """Run the N nodes of a draft tree in one forward (see `hierspec.models.treemask`).

        input_ids [1, N] holds the node tokens (node 0 = the root, the last committed token);
        node i runs at position cache_length + depth(i) and attends to the whole cache and to its
        ancestors including itself. The N entries are appended to the cache in node order
        (cache_length += N); `compact` then keeps the accepted path. Returns logits [1, N, V]
        (float32, float64 for float64 models) and, if ``output_hidden``, the final-norm hidden
        states [1, N, H]; row i is what a chain forward of the path root..i gives at its end.
        On an exception the cache is rolled back to its previous length.
        """
        if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[0] != 1:
            shape = tuple(input_ids.shape)
            raise ValueError(f"forward_tree needs input_ids of batch size 1, got shape {shape}")
        ids = self._check_input(input_ids)
        start, new = self._length, ids.shape[1]
        p = check_parents(parents, new)
        positions = (start + tree_depths(p)).to(self.device).unsqueeze(0)
        return self._run(ids, positions, self._tree_attention_mask(p, start), output_hidden)

    def compact(self, start: int, keep: Sequence[int] | torch.Tensor) -> None:
        """Keep cache positions 0..start-1 followed by those at ``start + keep[j]``.

        ``keep``: strictly increasing offsets with ``start + keep[-1] < cache_length``, typically
        ``[0] + accepted path`` after `forward_tree` at cache_length ``start``. Afterwards
        cache_length == start + len(keep) and, when keep is a root-to-node path, the state equals
        a fresh prefill of the committed tokens (each kept node ran at start + its depth).
        """
        k = check_compact(start, keep, self._length)
        new_length = start + k.numel()
        if bool((k == torch.arange(k.numel())).all()):  # already in place: a plain crop
            self.crop(new_length)
            return
        if new_length == 0:
            self.reset()
            return
        idx = torch.cat([torch.arange(start), start + k])
        with torch.inference_mode():
            for layer in self._cache.layers:
                if layer.is_initialized and layer.get_seq_length() > 0:
                    sel = idx.to(layer.keys.device)
                    layer.keys = layer.keys.index_select(-2, sel)
                    layer.values = layer.values.index_select(-2, sel)
        self._length = new_length

    def _rollback_layers(self, length: int) -> None:
        """Bring every cache layer back to ``length`` positions (after a failed forward)."""
        with torch.inference_mode():
            for layer in self._cache.layers:
                extra = layer.get_seq_length() - length
                if extra > 0:
                    layer.crop(-extra)

    def crop(self, length: int) -> None:
        """Drop every cached position >= length (0 <= length <= cache_length)."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(f"crop length must be an int, got {type(length).__name__}")
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        if length > self._length:
            raise ValueError(f"cannot crop to {length}: cache holds only {self._length} positions")
        if length == self._length:
            return
        if length == 0:
            self.reset()
            return
        with torch.inference_mode():
            # transformers >= 5: a negative argument drops that many trailing positions.
            self._cache.crop(-(self._length - length))
        self._length = length

    def reset(self) -> None:
        """Empty the cache (equivalent to ``crop(0)``)."""
        self._cache = _new_cache()
        self._length = 0
        self._batch = None

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return (
            f"HFModel({name}, vocab_size={self.vocab_size}, dtype={self.dtype}, "
            f"cache_length={self._length}/{self.max_length})"
        )


def _compiled(model: PreTrainedModel, compile: bool | Mapping[str, Any]) -> Any:
    """``model`` itself, or ``torch.compile(model, dynamic=True, **options)`` (see module docstring)."""
    if compile is False or compile is None:
        return model
    if compile is True:
        options: dict[str, Any] = {}
    elif isinstance(compile, Mapping):
        options = dict(compile)
    else:
        raise ValueError(f"compile: expected a bool or a mapping of torch.compile options, got {compile!r}")
    options.setdefault("dynamic", True)
    return torch.compile(model, **options)
