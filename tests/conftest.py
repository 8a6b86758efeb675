import os

# Tests run small shapes on the CPU; keep JAX from grabbing an accelerator's memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Compiles are most of the suite's time. XLA's backend optimisation level 0
# (LLVM's, not the HLO passes, which still fuse as they do by default) takes
# the suite from about 8 to about 6 minutes on two cores. Name a level in
# XLA_FLAGS to test at another, e.g. the default: --xla_backend_optimization_level=3.
# Subprocesses that the tests start inherit the flag.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"])
    )
