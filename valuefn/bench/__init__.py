"""The benchmark suite behind ``valuefn bench``.

Every benchmark is a module with one entry point, ``run(quick: bool) ->
list[Figure]``: :mod:`~valuefn.bench.hardware` (the machine's memory bandwidth
and matmul rate, the floors the other figures are measured against),
:mod:`~valuefn.bench.targets` (GAE kernels), :mod:`~valuefn.bench.update`
(the critic's update step), :mod:`~valuefn.bench.footprint` (its compile time
and memory against the sequence length), :mod:`~valuefn.bench.rollout`,
:mod:`~valuefn.bench.iteration` (one whole training iteration) and
:mod:`~valuefn.bench.scaling`. :mod:`~valuefn.bench.suite` runs them, prints
one table and writes the results as JSON. The scripts in the repository's
``benchmarks/`` folder run the same modules.
"""
