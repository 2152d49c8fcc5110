"""Verification rules: given draft tokens, the draft distribution they were drawn from and the
target's distributions from one forward pass, decide how many tokens to accept and which token
comes next, such that the output is distributed exactly as the target.

    RULES["token"]   token-wise speculative sampling (Leviathan et al.; Chen et al.)
    RULES["block"]   block verification (Sun et al., ICLR 2025), optimal for one draft block
    RULES["hsd"]     hierarchical speculative sampling (Zhou et al.), capped and consistent;
                     equal in law to "block", computed in its branch-mass form
    RULES["match"]   the engines' rule (llama.cpp, SGLang): sample the target, accept while equal
    RULES["greedy"]  temperature 0: accept while the draft equals the target argmax

Deterministic (one-hot) drafts are verified by every exact rule with one coupled sampler
(`coupled`): row t emits the target's inverse-CDF draw F_t^{-1}(u_t), so with uniforms keyed by
position a seeded text does not depend on draft lengths.

`naive_hsd.law` is the uncapped HSD with forward sampling, as an analysis API only.
`tree` verifies a draft tree (recursive rejection sampling: `tree.verify_tree`, `tree.tree_law`);
it is not a chain rule, so it is not in RULES.

Every rule is callable as ``rule(draft_tokens[B,K], draft_probs[B,K,V] | None,
target_probs[B,K+1,V], generator=None)`` and has ``rule.law(...)`` for one draft; see `core`.
"""

from . import block, coupled, greedy, hsd, naive_hsd, token, tree
from .core import PROB_SUM_TOL, Rule, VerifyOutput, check_inputs

RULES: dict[str, Rule] = {m.rule.name: m.rule for m in (token, block, hsd, coupled, greedy)}


def get_rule(name: str) -> Rule:
    """The rule called `name`; ValueError listing the valid names otherwise."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown verification rule {name!r}; expected one of {sorted(RULES)}") from None


__all__ = [
    "PROB_SUM_TOL",
    "RULES",
    "Rule",
    "VerifyOutput",
    "block",
    "check_inputs",
    "coupled",
    "get_rule",
    "greedy",
    "hsd",
    "naive_hsd",
    "token",
    "tree",
]
