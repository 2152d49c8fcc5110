"""Batched tree decode for `TinyGPT` and `DraftLM` drafts: all speculation branches advance in
one forward.

Branch b = (k_b, t_b) continues the committed prefix c (length L) with s_1..s_{k_b} and its bonus
t_b. The draft's KV cache holds c s_1..s_n (length P = L + n) after the glue decode, and is only
read here. At tree depth d every branch feeds one token at its logical position L + k_b + d and
attends to

    cache positions j < L + k_b        (its own prefix; later glue tokens are masked out)
    its own tree tokens of depth <= d  (scratch K/V, [B, H, depth, head_dim] per layer)

which is the reference implementation's tril-repeated + identity mask with per-branch scratch KV.
The result equals a per-branch sequential decode up to float rounding (tested in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.draft import DraftLM, rotate_half
from ..models.tiny import TinyGPT


def supports_tree(model: object) -> bool:
    """Whether `tree_forward` can run on `model` (TinyGPT or DraftLM with a batch-1 cache)."""
    if isinstance(model, TinyGPT):
        return model.batch_size == 1
    return isinstance(model, DraftLM) and (model.k_cache is None or model.k_cache.shape[1] == 1)


@dataclass
class TreeState:
    """Scratch keys/values of the tree tokens: per layer [B, n_head, depth, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @staticmethod
    def empty(model: TinyGPT | DraftLM, branches: int, depth: int) -> TreeState:
        c = model.config
        if isinstance(model, DraftLM):
            shape, w = (branches, c.kv_heads, depth, c.head_dim), model.embed.weight
        else:
            shape, w = (branches, c.n_head, depth, c.head_dim), model.lm_head.weight
        return TreeState(
            [w.new_zeros(shape) for _ in range(c.n_layer)], [w.new_zeros(shape) for _ in range(c.n_layer)]
        )


@torch.no_grad()
def tree_forward(
    model: TinyGPT | DraftLM,
    ids: torch.Tensor,
    pos: torch.Tensor,
    prefix_len: torch.Tensor,
    state: TreeState,
    depth: int,
) -> torch.Tensor:
    """One tree step: ids/pos/prefix_len [B] (token, logical position, cache positions visible);
    writes the step's K/V at `depth` of `state`; returns logits [B, V]. The model's cache is not
    modified."""
    if isinstance(model, DraftLM):
        return _draft_tree_forward(model, ids, pos, prefix_len, state, depth)
    b = ids.shape[0]
    p = model.cache_length
    x = (model.tok_emb(ids) + model.pos_emb(pos))[:, None, :]  # [B, 1, d]
    visible = torch.arange(p, device=ids.device)[None, :] < prefix_len[:, None]
    mask = torch.cat([visible, visible.new_ones(b, depth + 1)], 1)[:, None, None, :]  # [B, 1, 1, P+depth+1]
    for i, blk in enumerate(model.blocks):
        dm = x.shape[-1]
        q, k, v = blk.qkv(blk.ln1(x)).split(dm, dim=-1)
        shape = (b, 1, blk.n_head, blk.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # [B, H, 1, hd]
        state.k[i][:, :, depth] = k[:, :, 0]
        state.v[i][:, :, depth] = v[:, :, 0]
        prefix_k = model.k_cache[i][0, :, :p].expand(b, -1, -1, -1)
        prefix_v = model.v_cache[i][0, :, :p].expand(b, -1, -1, -1)
        keys = torch.cat([prefix_k, state.k[i][:, :, : depth + 1]], 2)
        values = torch.cat([prefix_v, state.v[i][:, :, : depth + 1]], 2)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(blk.head_dim)
        att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ values
        x = x + blk.proj(att.transpose(1, 2).reshape(b, 1, dm))
        x = x + blk.out(F.gelu(blk.fc(blk.ln2(x))))
    return (model.lm_head(model.ln_f(x)) * model.config.logit_scale)[:, 0]


def _draft_tree_forward(
    model: DraftLM,
    ids: torch.Tensor,
    pos: torch.Tensor,
    prefix_len: torch.Tensor,
    state: TreeState,
    depth: int,
) -> torch.Tensor:
    """`tree_forward` for a `DraftLM` (RoPE at each branch's logical position, GQA keys):
    full-vocabulary logits [B, V] (-inf outside the draft's vocab_map)."""
    b = ids.shape[0]
    p = model.cache_length
    x = model.embed(model.map_ids(ids))[:, None, :]  # [B, 1, d]
    cos = model.rope_cos[pos].to(x.dtype)[:, None, None, :]  # [B, 1, 1, hd]
    sin = model.rope_sin[pos].to(x.dtype)[:, None, None, :]
    visible = torch.arange(p, device=ids.device)[None, :] < prefix_len[:, None]
    mask = torch.cat([visible, visible.new_ones(b, depth + 1)], 1)[:, None, None, :]
    for i, blk in enumerate(model.layers):
        h = blk.attn_norm(x)
        q = blk.q_proj(h).view(b, 1, blk.n_head, blk.head_dim).transpose(1, 2)
        k = blk.k_proj(h).view(b, 1, blk.n_kv, blk.head_dim).transpose(1, 2)
        v = blk.v_proj(h).view(b, 1, blk.n_kv, blk.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        state.k[i][:, :, depth] = k[:, :, 0]
        state.v[i][:, :, depth] = v[:, :, 0]
        keys = torch.cat([model.k_cache[i, 0, :, :p].expand(b, -1, -1, -1), state.k[i][:, :, : depth + 1]], 2)
        values = torch.cat(
            [model.v_cache[i, 0, :, :p].expand(b, -1, -1, -1), state.v[i][:, :, : depth + 1]], 2
        )
        att = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=blk.n_kv != blk.n_head
        )
        x = x + blk.o_proj(att.transpose(1, 2).reshape(b, 1, -1))
        h = blk.mlp_norm(x)
        x = x + blk.down_proj(F.silu(blk.gate_proj(h)) * blk.up_proj(h))
    reduced = model.reduced_head(model.norm(x))[:, 0]
    return model.expand_logits(
        reduced.float() if reduced.dtype in (torch.float16, torch.bfloat16) else reduced
    )
