"""GAE as Pallas GPU kernels that read the batch-major inputs themselves.

``gae(..., method="pallas")`` runs here when ``T`` is a multiple of the chunk;
otherwise it solves the recursion with the kernels of
:mod:`valuefn._pallas_scan` after XLA has computed the TD errors and moved them
time-major, a dozen passes over ``[B, T]`` arrays where GAE needs five (three
read, two written).

The state walked back in time is ``(A, V)``: the advantage and the value at the
next valid step. Each step is a map ``(A, V) -> (a A + b V + e, d V + f)``, and
two such maps compose into one of the same form (:mod:`valuefn._gae_maps`), so:

1. one kernel composes each chunk of ``chunk`` steps into one map;
2. one kernel walks the chunk maps of each block of rows back from the end,
   which gives the state entering each chunk from the right;
3. one kernel walks every chunk from that state and writes the advantages and
   returns.

Kernels 1 and 3 read rewards, values, and the discounts, lambda, mask,
truncation flags and final values where given and varying in time, one step
of ``rows`` rows at a time: strided loads, whose memory sectors the next steps
of the same program read from cache. The next valid value is part of the
state, so neither the shifted values nor the TD errors are ever written out:
about eight passes over ``[B, T]`` arrays in all with a mask (rewards, values
and mask read twice, advantages and returns written). Triton only: Mosaic GPU
wants contiguous loads of 128 elements.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from valuefn._gae_maps import apply, compose, step_map, walk, where
from valuefn._pallas_scan import compiler_params

Array = jax.Array

# Steps a program walks and rows it holds (powers of two). Chosen without a GPU
# measurement yet: the benchmark suite sweeps them on a GPU.
CHUNK = 64
ROWS = 32
# Chunk maps a program of the second kernel walks unrolled.
UNROLL = 16


def _inputs_at(steps: dict, t: int):
    """``(valid, gain, value, chain, lambda)`` at step ``t`` of the block.

    ``steps`` maps the names in :func:`_step_names` to refs; a ``[rows, 1]``
    ref is constant in time. ``gain = r - v``, plus ``gamma`` times the final
    value at a truncation, and ``chain``, the discount into the next valid
    step, is ``gamma``, 0 at a truncation; ``valid`` is the constant True
    without a mask.
    """

    def at(name):
        ref = steps[name]
        return ref[:, t] if ref.shape[1] > 1 else ref[:, 0]

    reward, value, gamma = at("rewards"), at("values"), at("discounts")
    gain, chain = reward - value, gamma
    if "truncated" in steps:
        cut = at("truncated") != 0
        gain = gain + jnp.where(cut, gamma * at("final_values"), 0.0)
        chain = jnp.where(cut, 0.0, gamma)
    valid = at("mask") != 0 if "mask" in steps else True
    return valid, gain, value, chain, at("lambda")


def _step_names(masked: bool, truncated: bool) -> tuple[str, ...]:
    """The per-step inputs the kernels read, in order."""
    names = ("rewards", "values", "discounts", "lambda")
    return names + ("mask",) * masked + ("truncated", "final_values") * truncated


def _split_refs(refs, names: tuple[str, ...], more_inputs: int):
    """The step refs by name, the ``more_inputs`` refs after them, the outputs."""
    count = len(names)
    steps = dict(zip(names, refs[:count], strict=True))
    return steps, refs[count : count + more_inputs], refs[count + more_inputs :]


def _compose_kernel(*refs, names: tuple[str, ...]):
    """One chunk's map from its steps' maps, written to column 0 of the outputs."""
    steps, _, outs = _split_refs(refs, names, 0)
    rows, chunk = steps["rewards"].shape
    whole = step_map(*_inputs_at(steps, chunk - 1))
    for t in range(chunk - 2, -1, -1):
        whole = compose(step_map(*_inputs_at(steps, t)), whole)
    for out, coefficient in zip(outs, whole, strict=True):
        out[:, 0] = jnp.broadcast_to(coefficient, (rows,)).astype(jnp.float32)


def _entering_kernel(a, b, e, d, f, bootstrap, advantage_ref, value_ref):
    """The state entering each chunk from the right, for one block of rows.

    The chunk maps are walked ``UNROLL`` at a time, unrolled, so that a group's
    loads are all issued before its chain of updates, in a loop over the groups
    (a loop that walked one map an iteration would wait for each load in turn).
    """
    chunks = a.shape[1]

    def walk_map(k, state):
        advantage_ref[:, k], value_ref[:, k] = state
        return apply(tuple(ref[:, k] for ref in (a, b, e, d, f)), state)

    groups, rest = divmod(chunks, UNROLL)
    state = (jnp.zeros(bootstrap.shape[:1], jnp.float32), bootstrap[:, 0])
    for k in range(chunks - 1, chunks - 1 - rest, -1):
        state = walk_map(k, state)

    def group(i, state):
        last = (groups - i) * UNROLL - 1
        for j in range(UNROLL):
            state = walk_map(last - j, state)
        return state

    jax.lax.fori_loop(0, groups, group, state)


def _walk_kernel(*refs, names: tuple[str, ...]):
    """One chunk's advantages and returns from the state entering it."""
    steps, (advantage_in, value_in), (advantages, returns) = _split_refs(refs, names, 2)
    state = (advantage_in[:, 0], value_in[:, 0])
    for t in range(steps["rewards"].shape[1] - 1, -1, -1):
        valid, gain, value, chain, lam = _inputs_at(steps, t)
        advantage, state = walk(valid, gain, value, chain, lam, state)
        advantages[:, t] = where(valid, advantage, 0.0)
        returns[:, t] = where(valid, advantage + value, 0.0)


def block_rows(shape: tuple[int, ...], *, chunk: int = CHUNK, rows: int = ROWS) -> int | None:
    """Rows a program of :func:`gae_pallas` holds for ``[..., T]`` inputs of
    ``shape``: ``rows``, or the largest power of two that divides a smaller
    flattened batch; None where ``T`` is not a multiple of ``chunk`` or the
    batch is empty."""
    if len(shape) < 1 or shape[-1] < 1 or shape[-1] % chunk:
        return None
    columns = math.prod(shape[:-1])
    if columns == 0:
        return None
    return rows if columns % rows == 0 else columns & -columns


@functools.partial(jax.jit, static_argnames=("chunk", "rows", "interpret"))
def gae_pallas(
    rewards: Array,
    values: Array,
    discounts: Array,
    bootstrap_value: Array,
    lambda_: Array,
    mask: Array | None = None,
    truncated: Array | None = None,
    final_values: Array | None = None,
    *,
    chunk: int = CHUNK,
    rows: int = ROWS,
    interpret: bool | None = None,
) -> tuple[Array, Array]:
    """GAE advantages and returns, both 0 on masked steps.

    ``rewards`` and ``values`` are ``[..., T]``, ``bootstrap_value`` ``[...]``;
    ``discounts``, ``lambda_``, ``mask`` (any dtype, nonzero for valid steps),
    ``truncated`` (nonzero where a time limit cut the episode after the step)
    and ``final_values`` (read at the cuts) broadcastable to ``[..., T]``, the
    last three optional (``final_values`` with ``truncated``). Inputs are as
    ``valuefn.gae`` has checked them. ``T`` must be a multiple of ``chunk``;
    the batch is cut into blocks of :func:`block_rows` rows. No derivative
    rules: ``valuefn.gae`` supplies them.
    """
    from jax.experimental import pallas as pl

    if chunk < 1 or rows < 1:
        raise ValueError(f"chunk and rows must be >= 1, got chunk={chunk}, rows={rows}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    shape = rewards.shape
    steps = shape[-1]
    rows = block_rows(shape, chunk=chunk, rows=rows)
    if rows is None:
        raise ValueError(
            f"rewards shape {shape}: T must be a multiple of chunk={chunk}, and the batch not empty"
        )
    columns = rewards.size // steps

    def batch_major(x, dtype=jnp.float32):
        """``[N, T]``, or ``[N, 1]`` when constant in time."""
        x = jnp.asarray(x, dtype)
        width = steps if x.ndim and x.shape[-1] == steps else 1
        if x.ndim and x.shape[-1] == 1:
            x = x[..., 0]
        x = jnp.broadcast_to(x[..., None] if width == 1 else x, shape[:-1] + (width,))
        return x.reshape(columns, width)

    def flags(x):
        """A mask or truncation flag ``[N, T]`` or ``[N, 1]``, bools as bytes."""
        x = jnp.asarray(x)
        return batch_major(x, jnp.int8 if x.dtype == jnp.bool_ else x.dtype)

    names = _step_names(mask is not None, truncated is not None)
    inputs = [batch_major(x) for x in (rewards, values, discounts, lambda_)]
    if mask is not None:
        inputs.append(flags(mask))
    if truncated is not None:
        inputs += [flags(truncated), batch_major(final_values)]
    chunks = steps // chunk
    grid = (columns // rows, chunks)
    params = compiler_params("triton")

    def spec(x):
        if x.shape[1] == 1:
            return pl.BlockSpec((rows, 1), lambda r, k: (r, 0))
        return pl.BlockSpec((rows, chunk), lambda r, k: (r, k))

    per_chunk = pl.BlockSpec((rows, 1), lambda r, k: (r, k))
    maps = pl.pallas_call(
        functools.partial(_compose_kernel, names=names),
        out_shape=[jax.ShapeDtypeStruct((columns, chunks), jnp.float32)] * 5,
        grid=grid,
        in_specs=[spec(x) for x in inputs],
        out_specs=[per_chunk] * 5,
        compiler_params=params,
        interpret=interpret,
    )(*inputs)
    whole_rows = pl.BlockSpec((rows, chunks), lambda r: (r, 0))
    entering = pl.pallas_call(
        _entering_kernel,
        out_shape=[jax.ShapeDtypeStruct((columns, chunks), jnp.float32)] * 2,
        grid=(columns // rows,),
        in_specs=[whole_rows] * 5 + [pl.BlockSpec((rows, 1), lambda r: (r, 0))],
        out_specs=[whole_rows] * 2,
        compiler_params=params,
        interpret=interpret,
    )(*maps, batch_major(bootstrap_value[..., None]))
    advantages, returns = pl.pallas_call(
        functools.partial(_walk_kernel, names=names),
        out_shape=[jax.ShapeDtypeStruct((columns, steps), jnp.float32)] * 2,
        grid=grid,
        in_specs=[spec(x) for x in inputs] + [per_chunk] * 2,
        out_specs=[spec(inputs[0])] * 2,
        compiler_params=params,
        interpret=interpret,
    )(*inputs, *entering)
    return advantages.reshape(shape), returns.reshape(shape)
