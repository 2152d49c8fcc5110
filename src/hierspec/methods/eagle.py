"""EAGLE feature-level draft heads (`hierspec.drafters.eagle`): ``eagle[:HEAD]`` drafts a chain,
``eagle-tree[:D/K/B[:HEAD]]`` an EAGLE-2 dynamic tree (depth D, top-k K, budget B) verified in
one target forward; HEAD: a head file (default the shipped head)."""

from __future__ import annotations

import argparse
import os

from .modelset import ModelSet
from .parts import Parts
from .spec import MethodError, MethodSpec, ints

__all__ = ["build_eagle", "eagle_from_flags", "parse_eagle", "tree_depth"]


def parse_eagle(text: str, arg: str | None) -> MethodSpec:
    kind, tree = "eagle", ()
    if text.startswith("eagle-tree"):
        kind = "eagle-tree"
        shape, _, arg = arg.partition(":") if arg and arg[0].isdigit() else ("", "", arg)
        tree = tuple(ints(text, shape, (3,))) if shape else (5, 4, 16)
    if arg and not os.path.isfile(arg):
        raise MethodError(f"method {text!r}: EAGLE head file {arg} does not exist")
    return MethodSpec(text, kind, tree=tree, head=arg or None)


def tree_depth(spec: MethodSpec) -> int:
    """A tree's draft length: its depth, whatever ``gamma`` says."""
    return spec.tree[0]


def build_eagle(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    from ..drafters.base import TreeSpec
    from ..drafters.eagle import EagleDrafter

    drafter = EagleDrafter(models.eagle(spec.head))
    if spec.tree:
        tree = TreeSpec(*spec.tree)
        return Parts(models.target, drafter, tree.depth, tree=tree)
    return Parts(models.target, drafter, gamma)


def eagle_from_flags(args: argparse.Namespace) -> str:
    """``--method eagle [--eagle HEAD] [--tree --tree-depth D --tree-topk K --tree-budget B]``."""
    head = f":{args.eagle}" if args.eagle else ""
    if not args.tree:
        return f"eagle{head}"
    for name in ("depth", "topk", "budget"):
        v = getattr(args, f"tree_{name}")
        if v < 1:
            raise MethodError(f"--tree-{name}: tree {name}: expected an integer >= 1, got {v}")
    return f"eagle-tree:{args.tree_depth}/{args.tree_topk}/{args.tree_budget}{head}"
