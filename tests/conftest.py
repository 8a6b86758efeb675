import os

# Tests run small shapes on the CPU; keep JAX from grabbing an accelerator's memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
