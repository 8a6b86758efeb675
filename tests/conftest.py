import os

from hypothesis import settings

from valuefn.bench.suite import add_xla_flags

# The property tests' examples: the same 100 in every run (derandomised, so that
# CI is reproducible), or 3,000 fresh ones with `--hypothesis-profile=thorough`
# (tests/test_targets.py takes 2 minutes so on two cores). No deadline: a new
# shape's first example includes its compile.
settings.register_profile("valuefn", max_examples=100, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=3000, deadline=None)
settings.load_profile("valuefn")

# Tests run small shapes on the CPU; keep JAX from grabbing an accelerator's memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Compiles are most of the suite's time, and two XLA CPU flags cut them while the
# HLO passes still fuse as they do by default: LLVM's optimisation level 0, and
# XLA's elemental emitters for fusions instead of its MLIR fusion emitters (the
# reference problem's tiny update step compiles in 0.85 s instead of 2.2 s).
# On two cores the suite takes about 13 minutes with the defaults, 9 with the
# first flag and 5 with both.
# Name either flag in XLA_FLAGS to test with another value, e.g. the defaults:
# --xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true.
# Each flag is added only where this jaxlib knows it (XLA aborts a process on an
# unknown flag). Every pytest process, xdist's workers too, sets them here; the
# subprocesses the tests start inherit them.
add_xla_flags(("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"))
