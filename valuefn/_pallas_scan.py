"""The reverse linear recursion ``x_t = deltas_t + coeffs_t * x_{t+1}`` as Pallas GPU kernels.

``gae(..., method="pallas")`` and the other target kernels' ``"pallas"`` method
solve their recursion here. The arrays are moved time-major, ``[T, N]``, so
that a step of ``rows`` columns is one contiguous load, and cut into chunks of
``chunk`` steps:

1. one kernel composes each chunk's steps into one map ``x -> X + P x``, the
   chunk's solution at its first step from ``x = 0`` after it and the product
   of its coefficients;
2. the chunk maps are the same recursion over ``T / chunk`` steps, solved the
   same way (one chunk of them is walked directly), which gives the value
   entering each chunk from the right;
3. one kernel walks every chunk from that value and writes ``x``.

Each kernel program walks ``chunk`` steps of ``rows`` columns unrolled, so its
loads are all issued before the chain of multiply-adds. The same kernels
compile with Pallas's Triton backend (any recent NVIDIA GPU) or its Mosaic GPU
backend (Hopper and later, blocks of a multiple of 128 columns); the Pallas
changelog marks the Triton backend deprecated from JAX 0.11. On other
platforms Pallas interprets them, which gives the same numbers slowly (the
tests run them that way).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

# Steps a kernel program walks, columns it holds (powers of two, as Triton's
# blocks must be) and the Pallas backend. Chosen without a GPU measurement yet:
# the benchmark suite sweeps them on a GPU (valuefn/bench/targets.py).
CHUNK = 64
ROWS = 32
BACKEND = "triton"
BACKENDS = ("triton", "mosaic_gpu")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _compose_kernel(deltas_ref, coeffs_ref, solution_ref, product_ref):
    """One chunk's map ``x -> solution + product * x`` from its steps' maps."""
    chunk = deltas_ref.shape[0]
    solution = jnp.zeros(deltas_ref.shape[1:], jnp.float32)
    product = jnp.ones(deltas_ref.shape[1:], jnp.float32)
    for t in range(chunk - 1, -1, -1):
        coeff = coeffs_ref[t, :]
        solution = deltas_ref[t, :] + coeff * solution
        product = coeff * product
    solution_ref[0, :] = solution
    product_ref[0, :] = product


def _walk_kernel(deltas_ref, coeffs_ref, entering_ref, out_ref):
    """One chunk's ``x`` from the value entering it from the right."""
    chunk = deltas_ref.shape[0]
    x = entering_ref[0, :]
    for t in range(chunk - 1, -1, -1):
        x = deltas_ref[t, :] + coeffs_ref[t, :] * x
        out_ref[t, :] = x


def compiler_params(backend: str):
    """Pallas compiler parameters for ``backend``: one warp a program on Triton."""
    # Imported here so that ``import valuefn`` does not load Pallas.
    if backend == "triton":
        from jax.experimental.pallas import triton as plt

        return plt.CompilerParams(num_warps=1, num_stages=1)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.CompilerParams()


def _call(kernel, inputs, outputs, *, chunk, rows, backend, interpret):
    """``kernel`` over a grid of (column blocks, chunks) of time-major ``[T, N]`` arrays.

    ``inputs`` and ``outputs`` are ``(array or shape, steps per block)``: a block
    covers ``chunk`` steps of the full arrays and 1 step of the per-chunk ones.
    """
    from jax.experimental import pallas as pl

    steps, columns = inputs[0][0].shape

    def spec(block_steps):
        return pl.BlockSpec((block_steps, rows), lambda r, k: (k, r))

    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32) for shape, _ in outputs],
        grid=(columns // rows, steps // chunk),
        in_specs=[spec(block) for _, block in inputs],
        out_specs=[spec(block) for _, block in outputs],
        compiler_params=compiler_params(backend),
        interpret=interpret,
    )(*(array for array, _ in inputs))


def _solve_time_major(
    deltas: Array, coeffs: Array, chunk: int, rows: int, backend: str, interpret: bool
):
    """``x`` for time-major ``[T, N]`` float32 inputs, ``T`` a multiple of ``chunk``
    and ``N`` of ``rows``."""
    steps, columns = deltas.shape
    chunks = steps // chunk
    call = functools.partial(_call, chunk=chunk, rows=rows, backend=backend, interpret=interpret)
    if chunks == 1:
        entering = jnp.zeros((1, columns), jnp.float32)
    else:
        per_chunk = (chunks, columns)
        solution, product = call(
            _compose_kernel,
            [(deltas, chunk), (coeffs, chunk)],
            [(per_chunk, 1), (per_chunk, 1)],
        )
        # The chunk maps' own recursion, padded to whole chunks with zero maps
        # after the last one: the value after the last chunk is 0.
        padded = _round_up(chunks, chunk)
        solution, product = (
            jnp.pad(x, ((0, padded - chunks), (0, 0))) for x in (solution, product)
        )
        starts = _solve_time_major(solution, product, chunk, rows, backend, interpret)[:chunks]
        # The value entering chunk k from the right is chunk k + 1's start.
        entering = jnp.concatenate([starts[1:], jnp.zeros((1, columns), jnp.float32)])
    (out,) = call(
        _walk_kernel,
        [(deltas, chunk), (coeffs, chunk), (entering, 1)],
        [((steps, columns), chunk)],
    )
    return out


# Jitted so that eager calls trace the kernels once per shape.
@functools.partial(jax.jit, static_argnames=("chunk", "rows", "backend", "interpret"))
def reverse_linear_pallas(
    deltas: Array,
    coeffs: Array,
    *,
    chunk: int = CHUNK,
    rows: int = ROWS,
    backend: str = BACKEND,
    interpret: bool | None = None,
) -> Array:
    """Solves ``x_t = deltas_t + coeffs_t * x_{t+1}``, ``x_T = 0``, along the last axis.

    ``deltas`` is ``[..., T]``; ``coeffs`` is ``[..., T]`` or ``[...]`` when
    constant in time. Returns float32 ``[..., T]``. ``backend`` is one of
    :data:`BACKENDS`; ``interpret`` None means True off GPUs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    # A chunk of one step would recurse on the same shape for ever.
    if chunk < 2 or rows < 1:
        raise ValueError(f"chunk must be >= 2 and rows >= 1, got chunk={chunk}, rows={rows}")
    if backend == "mosaic_gpu" and rows % 128:
        raise ValueError(f"rows must be a multiple of 128 for Mosaic GPU, got {rows}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    shape = deltas.shape
    steps = shape[-1]
    coeffs = jnp.broadcast_to(coeffs if coeffs.ndim == deltas.ndim else coeffs[..., None], shape)
    columns = math.prod(shape[:-1])
    if steps == 0 or columns == 0:
        return jnp.zeros(shape, jnp.float32)
    padded_steps, padded_columns = _round_up(steps, chunk), _round_up(columns, rows)
    # Padding steps come after the last one, with delta 0: x stays 0 through them.
    widths = ((0, padded_steps - steps), (0, padded_columns - columns))

    def time_major(x):
        return jnp.pad(x.astype(jnp.float32).reshape(columns, steps).T, widths)

    out = _solve_time_major(time_major(deltas), time_major(coeffs), chunk, rows, backend, interpret)
    return out[:steps, :columns].T.reshape(shape)
