"""Shared core of cprec: the behaviour text template and the language-model loading/pooling.

Both the online service and the offline training import from here, so a model is always served
with exactly the text format and pooling it was trained with.
"""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin about 3 ms (libgomp's default) before sleeping when they wait at a
# barrier. While a service shares the cores with its event loop, that spinning takes the CPU the
# loop needs and the loop in turn stalls the spinning team; 0.2 ms (20,000 spins) raised
# /recommend throughput at concurrency 32 on 2 cores without slowing raw forwards (perf, issue 5;
# bench/serve.py runs its raw encoder under the same setting). libgomp reads it when torch is
# first imported: the service and the benchmarks import this package before torch (tests/perf
# pins that); an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
