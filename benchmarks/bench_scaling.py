"""Weak scaling of the update step over 1, 2, 4 and 8 devices.

Run from the repository root: python -m benchmarks.bench_scaling [--quick]

The benchmark is :mod:`valuefn.bench.scaling`; this runs it with the machine's
limits and prints its table (``valuefn bench`` runs the whole suite).
"""

import sys

from valuefn import _host
from valuefn.bench.suite import main

if __name__ == "__main__":
    _host.rerun_with_huge_pages("benchmarks.bench_scaling")
    argv = ["--only", "scaling", "--no-save", *sys.argv[1:]]
    sys.exit(main(argv, prog="python -m benchmarks.bench_scaling"))
