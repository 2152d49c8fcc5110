"""Weights shipped with hierspec for the embedded SmolLM2-135M-Instruct (``hierspec/weights/``).

    drafts       standalone reduced-vocabulary drafts (`hierspec.models.draft`), by name
    exit heads   early-exit heads on the frozen target (`hierspec.models.early_exit`), by exit layer
    EAGLE head   a feature-level draft head on the target's hidden states (`hierspec.models.eagle`)

Each file has a model card next to it (same stem, ``.md``) with its data, training time, size
and measured numbers; ``calibration-<dtype>.json`` is the planner's calibration of the drafts
on this project's machine. ``DEFAULT_DRAFT`` is the draft ``hierspec generate --method draft`` uses
when no ``--draft`` is given; ``DEFAULT_EXITS`` are HiSpec's (L_d, L_i) defaults.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_EXITS",
    "DRAFTS",
    "EAGLE_HEAD",
    "EXIT_HEADS",
    "WEIGHTS_DIR",
    "calibration_path",
    "draft_path",
    "eagle_path",
    "exit_head_path",
]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DRAFTS = {
    "small": "smollm2-draft-small.safetensors",
    "large": "smollm2-draft-large.safetensors",
}
EXIT_HEADS = {4: "smollm2-exit4.safetensors", 8: "smollm2-exit8.safetensors"}
EAGLE_HEAD = "smollm2-eagle.safetensors"
DEFAULT_DRAFT = "small"
DEFAULT_EXITS = (4, 8)


def draft_path(name: str) -> Path:
    """The shipped draft called ``name`` (see `DRAFTS`)."""
    if name not in DRAFTS:
        raise ValueError(f"unknown shipped draft {name!r}; shipped drafts: {', '.join(DRAFTS)}")
    return _existing(WEIGHTS_DIR / DRAFTS[name])


def exit_head_path(exit_layer: int) -> Path:
    """The shipped early-exit head at ``exit_layer`` (see `EXIT_HEADS`)."""
    if exit_layer not in EXIT_HEADS:
        raise ValueError(
            f"no shipped early-exit head at layer {exit_layer}; shipped exits: "
            f"{', '.join(map(str, EXIT_HEADS))}"
        )
    return _existing(WEIGHTS_DIR / EXIT_HEADS[exit_layer])


def eagle_path() -> Path:
    """The shipped EAGLE head (`hierspec.models.eagle`) for SmolLM2."""
    return _existing(WEIGHTS_DIR / EAGLE_HEAD)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"shipped weights {path} are missing (a broken install?)")
    return path


def calibration_path(dtype: str = "float32") -> Path:
    """The shipped calibration (`hierspec calibrate` of the shipped drafts on this project's
    machine) that ``--method hierarchy`` plans its default stack from."""
    return _existing(WEIGHTS_DIR / f"calibration-{dtype}.json")
