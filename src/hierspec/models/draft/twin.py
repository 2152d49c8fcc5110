"""A shipped `DraftLM` as the equivalent transformers model, for transformers' own assisted
generation with the same draft (the HF bridge's bench peer, `hierspec.bench.hf_bridge`)."""

from __future__ import annotations

from typing import Any

import torch


def transformers_twin(draft: Any) -> Any:
    """A `hierspec.models.DraftLM` as the equivalent transformers ``LlamaForCausalLM`` (same
    weights and dtype): the input table expanded to the target vocabulary (ids outside
    ``vocab_map`` read the UNK row), the head's rows scattered to their target ids and a forward
    hook that sets every other logit to -inf, as `DraftLM` does (its proposal q is 0 there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = draft.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.ff_dim,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_length,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    twin = LlamaForCausalLM(cfg).to(draft.dtype).eval()
    vm = draft.vocab_map
    state = {
        "model.embed_tokens.weight": draft.embed.weight[draft.inv_map],
        "model.norm.weight": draft.norm.weight,
        "lm_head.weight": torch.zeros(c.vocab_size, c.d_model, dtype=draft.dtype).index_copy(
            0, vm, draft.head_weight.detach()
        ),
    }
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    for i, layer in enumerate(draft.layers):
        for name, p in layer.named_parameters():
            part = name.rpartition(".")[0]
            where = (
                names.get(part)
                or ("self_attn." if part.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.")
                + part
            )
            state[f"model.layers.{i}.{where}.weight"] = p
    twin.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    outside = torch.full((c.vocab_size,), float("-inf"), dtype=draft.dtype).index_fill(0, vm, 0.0)
    twin.lm_head.register_forward_hook(lambda _m, _i, out: out + outside.to(out.device, out.dtype))
    return twin
