"""``draft:MODEL``: a draft model proposes, the target verifies (``--draft`` on the command line)."""

from __future__ import annotations

import argparse

from ..drafters.model import ModelDrafter
from ..drafters.text import TextDrafter, text_drafter
from .modelset import ModelSet
from .parts import Parts
from .spec import MethodSpec

__all__ = ["build_draft", "draft_from_flags"]


def build_draft(
    spec: MethodSpec, models: ModelSet, rule: str, gamma: int, *, draft_sampling: str = "sample"
) -> Parts:
    """``draft_sampling`` at T > 0: "sample" (draw from q) or "greedy" (its argmax, the engines'
    practice); see `hierspec.drafters.model`. A draft of another model family (another
    vocabulary) drafts text, re-tokenized for the target (`hierspec.drafters.text.TextDrafter`:
    deterministic, so exact under every rule); the note says which kind it is."""
    tok = models.draft_tokenizer(spec.path)
    if tok is None or models.tokenizer is None:
        return Parts(models.target, ModelDrafter(models.draft(spec.path), draft_sampling), gamma)
    model = models.draft(spec.path, strict=False)
    drafter, note = text_drafter(
        (models.target, models.tokenizer), (model, tok), model_kwargs={"sampling": draft_sampling}
    )
    text = isinstance(drafter, TextDrafter)
    return Parts(models.target, drafter, gamma, note=f"hierspec: draft {spec.path}: {note}" if text else None)


def draft_from_flags(args: argparse.Namespace) -> str:
    """``--method draft [--draft MODEL]`` (default the shipped draft) as a spec."""
    from ..models import shipped

    return f"draft:{args.draft or shipped.DEFAULT_DRAFT}"
