"""Test-wide settings: one torch thread.

The tests use tiny models (where threading only adds overhead) and one SmolLM2 check. On a shared
2-core machine, two-thread OpenMP ops slow down 5-10x as soon as another process competes for a
core; one thread keeps the suite's time stable (benchmarks set their own thread count).
"""

import torch

torch.set_num_threads(1)
