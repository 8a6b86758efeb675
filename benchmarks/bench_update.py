"""Tokens per second of the critic's update step: valuefn (JAX) against PyTorch eager.

Run from the repository root:
python -m benchmarks.bench_update [--quick] [--default-xla-flags] [--markdown]

The benchmark is :mod:`valuefn.bench.update`; this runs it with the machine's
limits and prints its table (``valuefn bench`` runs the whole suite). Unless
``--default-xla-flags`` is given, XLA's CPU backend runs with the suite's tuned
flags (YNNPACK matmuls and reductions).
"""

import sys

from valuefn import _host
from valuefn.bench.suite import main

if __name__ == "__main__":
    _host.rerun_with_huge_pages("benchmarks.bench_update")
    argv = ["--only", "update", "--no-save", *sys.argv[1:]]
    sys.exit(main(argv, prog="python -m benchmarks.bench_update"))
