"""The Pallas kernels' settings swept on a GPU, at 256 x 4096, against their defaults.

The chunk and block sizes of GAE's kernels that read the inputs (the path
``gae pallas`` takes there, valuefn/_pallas_gae.py), and the backend (Triton
or Mosaic GPU), chunk and block sizes of the recursion alone
(valuefn/_pallas_scan.py). The suite runs this benchmark last: the settings
are experimental compilations, and a compiler that takes the process down
should cost these figures only. Elsewhere Pallas interprets its kernels and
nothing is timed.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax

from valuefn.bench.figures import Figure, Skipped
from valuefn.bench.targets import (
    FUSED_SWEEP,
    PALLAS_SWEEP,
    PALLAS_SWEEP_SHAPE,
    _pallas_fails,
    fused_sweep,
    pallas_sweep,
)


def run(quick: bool) -> Iterator[list[Figure] | Skipped]:
    """Each sweep, one setting at a time (``quick``: one setting of each)."""
    if jax.default_backend() != "gpu":
        yield Skipped("", "Pallas compiles its kernels on a GPU only")
        return
    failure = _pallas_fails()
    if failure is not None:
        yield Skipped("", failure)
        return
    repeats = 3 if quick else 27
    shape = (2, 64) if quick else PALLAS_SWEEP_SHAPE
    for sweep, configs in ((fused_sweep, FUSED_SWEEP), (pallas_sweep, PALLAS_SWEEP)):
        yield from sweep(*shape, configs[:1] if quick else configs, repeats=repeats)
