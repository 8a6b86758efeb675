"""The critic the update-step benchmarks train, its optimiser and its batches.

The reference model is the :class:`valuefn.TransformerValue` of the README
(vocab 1024, d_model 256, 4 layers, 4 heads: 3,487,489 parameters), trained
with ``clip_by_global_norm(1.0)`` and AdamW on the PPO clipped value loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import valuefn
from valuefn.bench.hardware import MATMUL, PEAK_BF16, datasheet_bf16, transformer_flops

CLIP_EPSILON, LEARNING_RATE, MAX_GRAD_NORM, WEIGHT_DECAY = 0.2, 3e-4, 1.0, 0.01


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of a :class:`valuefn.TransformerValue` critic."""

    vocab: int = 1024
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False

    def describe(self) -> str:
        """The spec as a figure's name puts it, e.g. ``d256 L4 float32, remat``."""
        remat = ", remat" if self.remat else ""
        scan = ", scan layers" if self.scan_layers else ""
        return f"d{self.d_model} L{self.num_layers} {self.dtype}{remat}{scan}"


REFERENCE = ModelSpec()
TINY = ModelSpec(vocab=64, d_model=32, num_layers=1, num_heads=2)
# GPT-2 small's shape: 124M parameters at max_len 1024 (85M in the blocks).
GPT2_SMALL = ModelSpec(vocab=50257, d_model=768, num_layers=12, num_heads=12, dtype="bfloat16")


def make_model(spec: ModelSpec, max_len: int) -> valuefn.TransformerValue:
    """The critic ``spec`` describes, for rows of up to ``max_len`` tokens."""
    return valuefn.TransformerValue(
        spec.vocab,
        d_model=spec.d_model,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        max_len=max_len,
        dtype=jnp.dtype(spec.dtype),
        remat=spec.remat,
        scan_layers=spec.scan_layers,
        rngs=nnx.Rngs(0),
    )


def make_optimizer() -> optax.GradientTransformation:
    """AdamW after global-norm clipping, the settings the PyTorch baseline uses too."""
    return optax.chain(
        optax.clip_by_global_norm(MAX_GRAD_NORM),
        optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
    )


def make_problem(spec: ModelSpec, max_len: int):
    """``(graphdef, optimizer, state)`` with the state on the host (NumPy leaves)."""
    optimizer = make_optimizer()
    graphdef, state = valuefn.init_train_state(make_model(spec, max_len), optimizer)
    return graphdef, optimizer, jax.tree.map(np.asarray, state)


def make_update_step(graphdef, optimizer):
    """A freshly traced update step (a new jit, so it compiles anew)."""
    return valuefn.make_update_step(graphdef, optimizer, clip_epsilon=CLIP_EPSILON)


def make_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> valuefn.Batch:
    """Random tokens and targets, all tokens valid, old values near the targets (NumPy)."""
    rng = np.random.default_rng(seed)
    shape = (rows, seq_len)
    targets = rng.normal(size=shape).astype(np.float32)
    return valuefn.Batch(
        inputs=rng.integers(0, vocab, shape).astype(np.int32),
        targets=targets,
        mask=np.ones(shape, np.float32),
        old_values=(targets + 0.1 * rng.normal(size=shape)).astype(np.float32),
    )


def train_flops(spec: ModelSpec, rows: int, seq_len: int) -> float:
    """Model FLOPs of one update step on ``rows x seq_len`` tokens."""
    return transformer_flops(
        d_model=spec.d_model,
        num_layers=spec.num_layers,
        seq_len=seq_len,
        tokens=rows * seq_len,
    )


def floor_name(spec: ModelSpec) -> str:
    """The rate the update step of ``spec`` is held against.

    The measured matmul rate of its dtype; for bf16 on an accelerator with a
    datasheet peak (:func:`valuefn.bench.hardware.datasheet_bf16`), that peak,
    which makes the fraction the model FLOP utilisation.
    """
    if spec.dtype == "bfloat16" and datasheet_bf16(jax.devices()[0].device_kind) is not None:
        return PEAK_BF16
    return MATMUL[spec.dtype]


def step_work(spec: ModelSpec, rows: int, seq_len: int, updates: int = 1) -> dict:
    """The ``work`` and floor keywords of :func:`valuefn.bench.figures.timed` for
    ``updates`` update steps of ``spec`` on ``rows x seq_len`` tokens each."""
    return {
        "work": updates * rows * seq_len,
        "work_unit": "tokens",
        "floor": floor_name(spec),
        "floor_work": updates * train_flops(spec, rows, seq_len),
    }
