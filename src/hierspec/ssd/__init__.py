"""Speculative speculative decoding (Kumar, Dao, May, arXiv 2603.03251): the Saguaro speculator
pre-drafts for the likely outcomes of the verification in flight, in its own process.

    generate_ssd(target, draft, prompt_ids, ...)   one generation (starts/stops the speculator)
    SSDSession(target, draft, ...)                 many generations with one speculator process
    DraftSpec(path, dtype)                         the draft the speculator process loads
    Speculator                                     the draft side (cache, fork, Saguaro sampling)
    saguaro                                        fan-out allocation, fork, Saguaro sampling
    cost                                           the Theorem-7 cost model
    SSDStats                                       hit rates, E_hit / E_miss, T_p / T_v, faults
"""

from . import cost, saguaro
from .cost import predict, sd_speedup, ssd_over_sd_bounds, ssd_speedup
from .draft_spec import DraftSpec, build_draft_model
from .options import SSDOptions
from .session import SSDSession, generate_ssd
from .speculator import Proposal, Speculator
from .stats import SSDStats

__all__ = [
    "DraftSpec",
    "Proposal",
    "SSDOptions",
    "SSDSession",
    "SSDStats",
    "Speculator",
    "build_draft_model",
    "cost",
    "generate_ssd",
    "predict",
    "saguaro",
    "sd_speedup",
    "ssd_over_sd_bounds",
    "ssd_speedup",
]
