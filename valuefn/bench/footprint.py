"""Compile time and peak memory of the update step as the sequence grows.

The reference critic's update step on one row of ``T = 256, 1024, 4096``
tokens, with and without rematerialisation (``TransformerValue(remat=True)``
recomputes each block's activations in the backward pass instead of storing
them), and rematerialised with its blocks run by one scan
(``scan_layers=True``): XLA's CPU scheduler moves the recomputation of
unrolled blocks back to where the stored activations were, so there remat
lowers the peak only inside the scan, whose backward loop recomputes one
block at a time. Nothing runs: the step is lowered and compiled from
abstract shapes.

- Compile time: ``jit(...).lower(...).compile()`` of a freshly built step, so
  that no cache answers.
- Peak memory: from XLA's ``compiled.memory_analysis()``, temporaries plus
  arguments plus outputs, less the outputs that alias donated arguments (the
  new train state reuses the old one's buffers, so it is counted once).

Each figure's baseline is the same step at the shortest ``T``: its ratio is
below 1 by as much as the cost grows.

And the same against depth: the 124M-parameter critic
(``problem.GPT2_SMALL``, 12 blocks, bf16) at ``T = 256``, its blocks unrolled
(the baseline) and run by one ``nnx.scan`` (``TransformerValue(scan_layers=True)``),
which compiles one block instead of twelve.
"""

from __future__ import annotations

import dataclasses

import jax

from valuefn.bench import problem
from valuefn.bench.figures import Figure, Timing, measure

LENGTHS = (256, 1024, 4096)
QUICK_LENGTHS = (16,)


def peak_bytes(compiled) -> int:
    """Peak device memory of a compiled program, from XLA's memory analysis."""
    stats = compiled.memory_analysis()
    return (
        stats.temp_size_in_bytes
        + stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def run(quick: bool) -> list[Figure]:
    """Compile time and peak memory of the update step at each T (``quick``: tiny sizes)."""
    base_spec = problem.TINY if quick else problem.REFERENCE
    lengths = QUICK_LENGTHS if quick else LENGTHS
    figures = []
    for remat, scan in ((False, False), (True, False), (True, True)):
        spec = dataclasses.replace(base_spec, remat=remat, scan_layers=scan)
        figures += _compiles([(spec, seq_len) for seq_len in lengths])
    # Depth: the 124M critic's 12 blocks unrolled, then run by one scan.
    deep = dataclasses.replace(problem.TINY, num_layers=2) if quick else problem.GPT2_SMALL
    seq_len = lengths[0]
    figures += _compiles(
        [(dataclasses.replace(deep, scan_layers=scan), seq_len) for scan in (False, True)]
    )
    return figures


def _compiles(cases) -> list[Figure]:
    """Compile time and peak memory of the update step for each ``(spec, seq_len)``
    of ``cases`` on one row, each against the first case."""
    figures = []
    first: tuple[str, Timing, int] | None = None
    for spec, seq_len in cases:
        graphdef, optimizer, state = problem.make_problem(spec, seq_len)
        args = _abstract((state, problem.make_batch(1, seq_len, spec.vocab)))
        compiled = []

        def compile_step(graphdef=graphdef, optimizer=optimizer, args=args, out=compiled):
            step = problem.make_update_step(graphdef, optimizer)
            out.append(step.lower(*args).compile())

        timing = measure(compile_step, repeats=1, warmup=0)
        memory = peak_bytes(compiled[-1])
        name = f"T={seq_len} {spec.describe()}"
        first = first or (name, timing, memory)
        figures.append(
            Figure(
                f"update step compile {name}",
                timing.median,
                timing.min,
                timing.max,
                "s",
                baseline=f"compile {first[0]}",
                baseline_median=first[1].median,
            )
        )
        figures.append(
            Figure(
                f"update step peak memory {name}",
                memory,
                memory,
                memory,
                "bytes",
                baseline=f"memory {first[0]}",
                baseline_median=first[2],
            )
        )
    return figures
