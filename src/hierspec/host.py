"""What this machine's CPU is, read once from ``/proc/cpuinfo`` (Linux; empty elsewhere).

    cpu_model()   the ``model name`` of the first processor, or None
    cpu_flags()   its feature flags (``flags`` on x86, ``Features`` on ARM), or an empty set

Both are cached for the life of the process: the CPU does not change under a running program.
Used by the cost cache key (`hierspec.costs.host_key`), the llama.cpp backend (AMX detection)
and the benchmark's machine record.
"""

from __future__ import annotations

import functools

__all__ = ["cpu_flags", "cpu_model"]

CPUINFO = "/proc/cpuinfo"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """``name -> value`` of the first occurrence of each field of ``/proc/cpuinfo`` ({} if it
    cannot be read)."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(name.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str | None:
    """The CPU's model name (``model name`` in /proc/cpuinfo), or None when there is none."""
    return _cpuinfo().get("model name") or None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``flags``, or ``Features`` on ARM); empty when unknown."""
    info = _cpuinfo()
    value = info.get("flags", info.get("features", ""))
    return frozenset(value.split())
