"""Environment steps per second: the jitted, vmapped rollout against a host loop.

Run from the repository root: python -m benchmarks.bench_rollout [--quick]

The benchmark is :mod:`valuefn.bench.rollout`; this runs it with the machine's
limits and prints its table (``valuefn bench`` runs the whole suite).
"""

import sys

from valuefn import _host
from valuefn.bench.suite import main

if __name__ == "__main__":
    _host.rerun_with_huge_pages("benchmarks.bench_rollout")
    argv = ["--only", "rollout", "--no-save", *sys.argv[1:]]
    sys.exit(main(argv, prog="python -m benchmarks.bench_rollout"))
