"""Runs the whole benchmark suite: ``python -m benchmarks [--quick] [--only ...] [--out DIR]``.

The same as ``valuefn bench``; the benchmarks live in :mod:`valuefn.bench`.
"""

import sys

from valuefn import _host
from valuefn.bench.suite import main

_host.rerun_with_huge_pages("benchmarks")
sys.exit(main(prog="python -m benchmarks"))
