"""`LlamaCppModel`: a GGUF model on llama.cpp (llama-cpp-python's low-level API) behind the
`LanguageModel` protocol.

One llama.cpp context holds one sequence (seq_id 0). A forward fills a preallocated
``llama_batch`` (capacity ``n_batch``) with the new tokens at positions cache_length.. and asks for
logits on every row, runs ``llama_decode`` and copies the ``[T, V]`` float32 logits out once::

    forward(ids[1, T]):  batch.token[:T] = ids; batch.pos[:T] = L..L+T-1; batch.logits[:T] = 1
                         llama_decode(ctx, batch)                 (chunks of n_batch if T > n_batch)
                         logits[1, T, V] = copy of llama_get_logits(ctx)[:T]
    crop(n):             llama_memory_seq_rm(mem, 0, n, -1)       KV cells at positions >= n go

Invariant (the one of ``hierspec.models.base``): ``cache_length`` == positions held by seq 0, and
after ``crop(n)`` the state equals a fresh prefill of the first n tokens up to float rounding
(measured on SmolLM2 Q4_1 with flash attention, llama.cpp's "auto": a row of a T-token forward
equals the same row of T one-token forwards bitwise for T <= 48, and differs by up to ~1.3 in the
logits from T = 64, where llama.cpp switches kernels; without flash attention rows differ already
at small T. So verification forwards of a few tokens match plain decoding exactly; see
tests/test_llamacpp.py).

What this backend gives: float32 logits for every row, the last hidden states (after the final
norm, from llama.cpp's embeddings output with pooling NONE) on ``output_hidden=True``, KV roll-back
to any length. What it cannot do: ``forward_tree`` / ``compact`` (tree attention), layer-range
forwards (early exit), batch > 1 in ``forward`` (several sequences: `hierspec.models.llamacpp_batch`).

Bad input (missing, unreadable, non-GGUF or truncated file, an architecture llama.cpp cannot load,
``n_ctx`` beyond the model's training context) raises FileNotFoundError / ValueError naming the
path or the argument before a context is built. llama.cpp's log lines are captured while loading
(they go into the error message on failure) and dropped otherwise unless ``verbose=True`` or
llama-cpp-python's logger ("llama-cpp-python") has been given a level that lets them through.

llama_cpp is imported lazily (in the constructor), so importing this module needs only torch.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import Any, ClassVar

import numpy as np
import torch

from hierspec.models.base import ForwardOutput
from hierspec.models.llamacpp_lib import (
    CapturedLog,
    c_string,
    check_gguf_file,
    default_threads,
    free_all,
    host_has_amx,
    import_llama_cpp,
    install_log_callback,
)

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_BATCH = 512
BACKEND = "llama.cpp"
_NO_HIDDEN_HINT = "use the torch backend (--backend torch)"


# --------------------------------------------------------------------------- the model
class LlamaCppModel:
    """A GGUF model on llama.cpp with a position-addressed KV cache (see module docstring).

    Args:
        path: the GGUF file.
        n_ctx: context size = ``max_length``; default min(the model's training context, 4096); may
            not exceed the training context.
        n_threads: CPU threads for decoding (default: the CPUs this process may use).
        n_batch: most tokens per ``llama_decode`` call (longer forwards run in chunks); default
            min(n_ctx, 512).
        extra_buffers: let llama.cpp place weights in its extra CPU buffer types (AMX tiles,
            repacked layouts). Default: on, except on CPUs with AMX, where llama-cpp-python 0.3.36's
            AMX matmul segfaults (seen on an Intel Xeon with amx_int8, SmolLM2 Q4_1, 2026-12-01).
        flash_attn: use llama.cpp's flash-attention kernel (None: llama.cpp decides, "auto").
        verbose: let llama.cpp print its log to stderr.
        check_ids: check every forward that ids lie in ``[0, vocab_size)``.
        n_seq_max: sequences the context holds, each with its own KV stream of ``n_ctx`` positions
            (``forward`` / ``crop`` address sequence 0; `hierspec.models.llamacpp_batch` all).
        kv_unified: one KV stream shared by all sequences instead of one each: a batch then runs
            as one forward whatever its shape, but each row attends over every sequence's cells
            (masked); with one stream per sequence llama.cpp splits a ragged batch into equal
            forwards (`hierspec.serve.scheduler.ubatch_rows`).

    Logits are float32 ``[1, T, V]`` ordinary CPU tensors (callers may modify them).
    """

    backend: ClassVar[str] = BACKEND
    #: torch's intra-op threads while this model decodes (`hierspec.engine.generate` sets them):
    #: the per-step torch work (processing and verifying k + 1 rows) is small, and more threads
    #: spin against llama.cpp's own. Measured on the 2-core host with one core busy: a greedy
    #: verification of one 49,152-wide row took 214 us at 1 thread and 8 ms at 2.
    torch_threads: ClassVar[int] = 1

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int | None = None,
        extra_buffers: bool | None = None,
        flash_attn: bool | None = None,
        verbose: bool = False,
        check_ids: bool = True,
        n_seq_max: int = 1,
        kv_unified: bool = False,
    ) -> None:
        for name, value in (
            ("n_ctx", n_ctx), ("n_threads", n_threads), ("n_batch", n_batch), ("n_seq_max", n_seq_max)
        ):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.path = check_gguf_file(path)
        lcp = import_llama_cpp()
        self._lcp = lcp
        install_log_callback(lcp, verbose)
        self._handles: dict[str, Any] = {}
        self._finalizer = weakref.finalize(self, free_all, lcp, self._handles)

        with CapturedLog(verbose) as log:
            lcp.llama_backend_init()
            mparams = lcp.llama_model_default_params()
            mparams.n_gpu_layers = 0
            self.extra_buffers = not host_has_amx() if extra_buffers is None else bool(extra_buffers)
            mparams.use_extra_bufts = self.extra_buffers
            model = lcp.llama_model_load_from_file(os.fsencode(self.path), mparams)
        if not model:
            detail = log.errors() or "llama.cpp could not load it"
            raise ValueError(
                f"llama.cpp cannot load the GGUF model {str(self.path)!r} (truncated, damaged or an "
                f"unsupported architecture): {detail}"
            )
        self._handles["model"] = model
        self._model = model
        self._vocab = lcp.llama_model_get_vocab(model)
        self.vocab_size: int = int(lcp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train: int = int(lcp.llama_model_n_ctx_train(model))
        self.hidden_size: int = int(lcp.llama_model_n_embd(model))
        if n_ctx is None:
            n_ctx = (
                min(self.n_ctx_train, DEFAULT_MAX_CONTEXT) if self.n_ctx_train > 0 else DEFAULT_MAX_CONTEXT
            )
        elif self.n_ctx_train > 0 and n_ctx > self.n_ctx_train:
            raise ValueError(
                f"n_ctx={n_ctx} exceeds the context the model {self.path.name!r} was trained for "
                f"({self.n_ctx_train}); pass n_ctx <= {self.n_ctx_train}"
            )
        self.max_length: int = int(n_ctx)
        self.n_threads: int = int(n_threads or default_threads())
        self.n_batch: int = int(min(n_batch or DEFAULT_BATCH, self.max_length))

        self.n_seq_max: int = int(n_seq_max)
        cparams = lcp.llama_context_default_params()
        cparams.n_ctx = self.max_length * self.n_seq_max  # a KV stream of max_length per sequence
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.n_seq_max
        cparams.kv_unified = bool(kv_unified)
        self.kv_unified = bool(kv_unified)
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.embeddings = False
        cparams.pooling_type = lcp.LLAMA_POOLING_TYPE_NONE
        cparams.no_perf = True
        if flash_attn is not None:
            cparams.flash_attn_type = (
                lcp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lcp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        with CapturedLog(verbose) as log:
            ctx = lcp.llama_init_from_model(model, cparams)
        if not ctx:
            raise ValueError(
                f"llama.cpp could not create a context of n_ctx={self.max_length} for "
                f"{str(self.path)!r}: {log.errors() or 'out of memory?'}"
            )
        self._handles["ctx"] = ctx
        self._ctx = ctx
        self._mem = lcp.llama_get_memory(ctx)
        self._embeddings_on = False

        # One batch for every forward: seq id, n_seq_id and the logits flags never change.
        batch = lcp.llama_batch_init(self.n_batch, 0, 1)
        self._handles["batch"] = batch
        self._handles["batch_alive"] = True
        self._batch = batch
        self._tok = np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))  # int32 views
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))[:] = 1
        self._want = np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))  # int8 output flags
        self._want[:] = 1
        for i in range(self.n_batch):
            batch.seq_id[i][0] = 0
        self._decode = lcp.llama_decode
        self._get_logits = lcp.llama_get_logits

        self.check_ids = check_ids
        self._length = 0
        self.metadata: dict[str, str] = self._read_metadata()
        self.architecture: str = self.metadata.get("general.architecture", "")
        self.ftype: str = self._ftype_name()
        self.token_bos: int = int(lcp.llama_vocab_bos(self._vocab))
        self.token_eos: int = int(lcp.llama_vocab_eos(self._vocab))
        self.token_eot: int = int(lcp.llama_vocab_eot(self._vocab))
        self.chat_template: str | None = self.metadata.get("tokenizer.chat_template")

    # ------------------------------------------------------------------ metadata
    def _read_metadata(self) -> dict[str, str]:
        """Scalar GGUF metadata as strings (arrays such as the token list are left out)."""
        lcp, model = self._lcp, self._model
        out: dict[str, str] = {}
        for i in range(int(lcp.llama_model_meta_count(model))):
            key = c_string(lambda b, n, i=i: lcp.llama_model_meta_key_by_index(model, i, b, n))
            if key.startswith("tokenizer.ggml.") and key.endswith(
                ("tokens", "scores", "token_type", "merges")
            ):
                continue
            out[key] = c_string(lambda b, n, i=i: lcp.llama_model_meta_val_str_by_index(model, i, b, n), 4096)
        return out

    def _ftype_name(self) -> str:
        """The GGUF file type (weights' quantisation) as a short name, e.g. 'Q4_1', 'BF16'."""
        code = int(self._lcp.llama_model_ftype(self._model))
        for name in dir(self._lcp):
            if (
                name.startswith("LLAMA_FTYPE_")
                and getattr(self._lcp, name) == code
                and name != "LLAMA_FTYPE_GUESSED"
            ):
                return name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
        return f"ftype {code}"

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        """One line: file name, architecture, file type, context and threads."""
        return (
            f"{self.path.name} ({self.architecture}, {self.ftype}, llama.cpp, n_ctx={self.max_length}, "
            f"threads={self.n_threads})"
        )

    # ------------------------------------------------------------------ protocol properties
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def threads(self) -> int:
        return self.n_threads

    @property
    def cache_length(self) -> int:
        """Number of positions currently held in the KV cache."""
        return self._length

    # ------------------------------------------------------------------ protocol methods
    def _check_input(self, input_ids: torch.Tensor) -> np.ndarray:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be [1, T] with T >= 1 (the llama.cpp backend runs batch size 1), "
                f"got shape {tuple(input_ids.shape)}"
            )
        new = input_ids.shape[1]
        if self._length + new > self.max_length:
            raise ValueError(
                f"forward of {new} tokens at cache_length {self._length} exceeds max_length {self.max_length}"
            )
        ids = input_ids[0].numpy(force=True)
        if self.check_ids:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        return ids

    def _set_embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            self._lcp.llama_set_embeddings(self._ctx, on)
            self._embeddings_on = on

    def forward(self, input_ids: torch.Tensor, *, output_hidden: bool = False) -> ForwardOutput:
        """Run ``input_ids`` [1, T] at positions cache_length.. and append them to the cache.

        Returns logits [1, T, V] float32 and, if ``output_hidden``, the last hidden states
        [1, T, H] (after the final norm) as float32. On an error the cache is rolled back.
        """
        ids = self._check_input(input_ids)
        new, v = ids.shape[0], self.vocab_size
        self._set_embeddings(output_hidden)
        logits = torch.empty((1, new, v), dtype=torch.float32)  # [1, T, V]
        hidden = torch.empty((1, new, self.hidden_size), dtype=torch.float32) if output_hidden else None
        row_bytes, h_bytes = v * 4, self.hidden_size * 4
        start = self._length
        for a in range(0, new, self.n_batch):
            n = self._decode_chunk(ids[a : a + self.n_batch], start)
            # one memmove per chunk: llama.cpp's [n, V] float32 rows -> the output tensor
            ctypes.memmove(logits.data_ptr() + a * row_bytes, self._get_logits(self._ctx), n * row_bytes)
            if hidden is not None:
                emb = self._lcp.llama_get_embeddings(self._ctx)
                if not emb:
                    self._rollback(start)
                    raise ValueError(
                        f"the llama.cpp backend gave no hidden states for {self.path.name}; {_NO_HIDDEN_HINT}"
                    )
                ctypes.memmove(hidden.data_ptr() + a * h_bytes, emb, n * h_bytes)
        return ForwardOutput(logits=logits, hidden=hidden)

    def prefill(self, input_ids: torch.Tensor) -> None:
        """`forward` without outputs: append ``input_ids`` [1, T] to the cache and compute no
        logits (llama.cpp skips the output head, and no [T, V] buffer is written). For a prompt
        whose logits are not read (the engine's prefill)."""
        ids = self._check_input(input_ids)
        self._set_embeddings(False)
        start = self._length
        self._want[:] = 0
        try:
            for a in range(0, ids.shape[0], self.n_batch):
                self._decode_chunk(ids[a : a + self.n_batch], start)
        finally:
            self._want[:] = 1

    def _decode_chunk(self, ids: np.ndarray, start: int) -> int:
        """llama_decode of ``ids`` (<= n_batch tokens) at cache_length; on failure roll back to
        ``start`` (the cache length before the whole forward) and raise. Returns the count."""
        n = ids.shape[0]
        pos = self._length
        self._tok[:n] = ids
        self._pos[:n] = np.arange(pos, pos + n, dtype=np.int32)
        self._batch.n_tokens = n
        rc = self._decode(self._ctx, self._batch)
        if rc != 0:
            self._rollback(start)
            raise RuntimeError(f"llama_decode failed with status {rc} (forward of {n} tokens at {pos})")
        self._length = pos + n
        return n

    __call__ = forward

    def _rollback(self, length: int) -> None:
        self._lcp.llama_memory_seq_rm(self._mem, 0, length, -1)
        self._length = length

    def crop(self, length: int) -> None:
        """Drop every cached position >= length (0 <= length <= cache_length)."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(f"crop length must be an int, got {type(length).__name__}")
        if not 0 <= length <= self._length:
            raise ValueError(f"crop length must be in 0..{self._length} (the cache length), got {length}")
        if length == self._length:
            return
        if length == 0:
            self.reset()
            return
        if not self._lcp.llama_memory_seq_rm(self._mem, 0, length, -1):
            raise RuntimeError(f"llama.cpp could not roll the KV cache back to {length} positions")
        self._length = length

    def reset(self) -> None:
        """Empty the cache (equivalent to ``crop(0)``)."""
        self._lcp.llama_memory_clear(self._mem, False)
        self._length = 0

    # ------------------------------------------------------------------ costs
    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free llama.cpp's model, context and batch now (the object is unusable afterwards)."""
        self._finalizer()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LlamaCppModel({self.describe()}, cache_length={self._length}/{self.max_length})"
