"""hierspec's lossless speculative decoding as a transformers ``custom_generate`` folder.

    model.generate(**inputs, custom_generate=hierspec.hf.CUSTOM_GENERATE_DIR, trust_remote_code=True,
                   method="suffix", gamma="auto", max_new_tokens=128)

transformers loads this file (``custom_generate/generate.py`` of the folder) and calls its
``generate(model=..., **generate's arguments)``; everything is done by `hierspec.hf.generate`
(which lets transformers validate and prepare the arguments, then decodes).
"""

from typing import Any

import hierspec.hf


def generate(model: Any, **kwargs: Any) -> Any:
    """`hierspec.hf.generate` (see its module docstring for the arguments)."""
    return hierspec.hf.generate(model, **kwargs)
