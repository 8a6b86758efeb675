"""Target kernels: GAE against PyTorch and NumPy loops and rlax, the other targets against rlax.

Per shape ``B x T`` (one row per sequence, the RLHF layout: responses of
``T / 2`` to ``T`` tokens, right-padded to ``T`` and masked):

- ``gae scan``, ``gae associative``, ``gae auto`` (and ``gae pallas`` on a
  GPU, where its kernels are compiled): :func:`valuefn.gae` jitted,
  against the PyTorch reverse loop (the loop of TRL and OpenRLHF: one Python
  iteration per token, eager), or the same loop in NumPy without torch. The
  loops run on the host: on an accelerator they are left out and the figures
  are held against their floor alone. Their
  floor is the memory bandwidth: rewards, values and mask read and advantages
  and returns written, 4 bytes each.
- ``gae auto, mask with gaps``: the same with one in ten of the response's
  steps masked as well (as multi-turn batches mask the turns that are not the
  policy's), which takes GAE's path for a mask with gaps (one recursion of
  the lambda-returns' mixture), against the same loop
  (whose work does not depend on the mask).
- against ``rlax.truncated_generalized_advantage_estimation`` vmapped over the
  batch, on the inputs rlax takes (per-step discounts, no mask), when rlax is
  installed, output for output: ``gae auto advantages, ...`` (the jitted call
  returns only the advantages, so XLA drops the returns) against rlax alone,
  and ``gae auto, ...`` (advantages and returns, what a critic trains on)
  against rlax plus ``advantages + values``.
- ``td_targets``, ``n_step_targets`` (n = 5), ``lambda_returns`` and
  ``discounted_returns`` on the same inputs, each against rlax's counterpart
  vmapped (``n_step_bootstrapped_returns`` with n = 1 for the one-step
  targets) when rlax is installed; floor: the ``[B, T]`` inputs read and the
  targets written.
- ``n_step_targets n=5, per-step discounts, right-padded mask``: the same
  with the right-padded mask (the path that sums by the runs' bounds),
  against the unmasked call of the same run: what the mask costs. And
  ``..., left-padded mask``: the same mask reversed in time, which takes the
  same path, against the right-padded call.

The compared calls are timed in turn, each timed call straight after an
untimed call of the same function, as the update steps are (see
:func:`valuefn.bench.figures.measure_many`).

The method map times ``associative`` (and ``pallas`` on a GPU) against
``scan`` over a grid of shapes (``ratio`` is the speed-up over ``scan``);
``auto`` is chosen from it. The Pallas kernels' settings are swept by
:mod:`valuefn.bench.sweeps`, which the suite runs last.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import valuefn
from valuefn import _pallas_gae, _pallas_scan
from valuefn.bench.figures import (
    Figure,
    Skipped,
    Timing,
    baseline_torch,
    measure_many,
    optional,
    timed,
)
from valuefn.bench.hardware import MEMORY

GAMMA, LAMBDA = 0.99, 0.95
RETURNS_N = 5  # the horizon of the n-step targets timed
SHAPES = ((64, 1024), (8, 8192), (256, 4096))
QUICK_SHAPES = ((4, 64),)
MAP_CPU = ((1, 64), (1, 1024), (1, 8192), (64, 64), (64, 1024), (64, 8192), (1024, 1024))
MAP_GPU = tuple(
    (b, t) for b in (1, 16, 256, 4096) for t in (64, 256, 1024, 4096, 16384) if b * t <= 1 << 26
)
QUICK_MAP = ((2, 32),)
GAPS = "gae auto, mask with gaps"
MASKED_N_STEP = "n_step_targets, right-padded mask"
LEFT_N_STEP = "n_step_targets, left-padded mask"
NO_MASK = "gae auto, per-step discounts, no mask"
NO_MASK_ADVANTAGES = "gae auto advantages, per-step discounts, no mask"
# (backend, chunk, rows) of the Pallas kernels swept on a GPU, and the shape
# swept; Mosaic GPU takes blocks of a multiple of 128 columns.
PALLAS_SWEEP = tuple(
    (backend, chunk, rows)
    for backend, rows_swept in (("triton", (32, 64, 128)), ("mosaic_gpu", (128, 256)))
    for chunk in (16, 32, 64, 128)
    for rows in rows_swept
)
PALLAS_SWEEP_SHAPE = (256, 4096)
# (chunk, rows) of the Pallas GAE kernels that read the inputs, swept at the same shape.
FUSED_SWEEP = tuple((chunk, rows) for chunk in (16, 32, 64, 128) for rows in (8, 16, 32, 64))


def methods() -> tuple[str, ...]:
    """The methods timed: ``pallas`` only where its kernels are compiled, on a GPU
    (elsewhere Pallas interprets them), and only if they compile there."""
    return _methods(_pallas_fails() if jax.default_backend() == "gpu" else None)


def _methods(pallas_failure: str | None) -> tuple[str, ...]:
    """:func:`methods`, given what :func:`_pallas_fails` said on a GPU."""
    timed_methods = ("scan", "associative", "auto")
    if jax.default_backend() != "gpu" or pallas_failure is not None:
        return timed_methods
    return timed_methods + ("pallas",)


def _small_pallas_calls():
    """The Pallas kernels on small inputs: the recursion over 300 steps, and GAE
    with a mask over 128, which reads its inputs in its own kernels."""
    x = jnp.ones((4, 300), jnp.float32)
    yield _pallas_scan.reverse_linear_pallas(x, x)
    x = jnp.ones((4, 128), jnp.float32)
    yield valuefn.gae(x, x, GAMMA, x[:, 0], LAMBDA, mask=x, method="pallas")


def _pallas_fails(run=None, options=None) -> str | None:
    """Why ``run()`` (by default :func:`_small_pallas_calls`) fails, or None:
    Pallas kernels that do not compile cost their own figures, not the others'.
    ``options`` names the configuration on stderr."""
    try:
        jax.block_until_ready(list(_small_pallas_calls()) if run is None else run())
    except Exception as err:  # any failure to lower, compile or run
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        print(f"[targets] pallas {options or 'defaults'} left out: {reason}", file=sys.stderr)
        return reason
    return None


def numpy_gae(rewards, values, bootstrap, mask):
    """Reverse loop over time in NumPy, masked as OpenRLHF masks its inputs."""
    rewards, values = rewards * mask, values * mask
    advantages = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[0], rewards.dtype)
    next_value = bootstrap
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + GAMMA * next_value - values[:, t]
        last = delta + GAMMA * LAMBDA * last
        advantages[:, t] = last
        next_value = values[:, t]
    return advantages, advantages + values


def torch_gae(torch, rewards, values, bootstrap, mask):
    """The TRL / OpenRLHF reverse loop: one Python iteration per token."""
    rewards, values = rewards * mask, values * mask
    last = 0.0
    reversed_advantages = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else bootstrap
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last = delta + GAMMA * LAMBDA * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def make_inputs(batch: int, horizon: int, seed: int = 0):
    """Rewards, values, bootstrap values and a right-padding mask: each row keeps
    its first ``T / 2`` to ``T`` steps."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, horizon)).astype(np.float32)
    values = rng.normal(size=(batch, horizon)).astype(np.float32)
    bootstrap = rng.normal(size=(batch,)).astype(np.float32)
    lengths = rng.integers(horizon // 2, horizon + 1, size=(batch, 1))
    mask = (np.arange(horizon) < lengths).astype(np.float32)
    return rewards, values, bootstrap, mask


def with_gaps(mask: np.ndarray, seed: int = 1) -> np.ndarray:
    """``mask`` with one in ten of its steps masked as well, at random."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(mask.shape) < 0.1, 0.0, mask).astype(np.float32)


def gae_bytes(batch: int, horizon: int, *, per_step_inputs: int = 3, outputs: int = 2) -> int:
    """Bytes a GAE kernel must move: ``per_step_inputs`` float32 ``[B, T]`` arrays
    read (rewards, values, and the mask or the discounts), the bootstrap ``[B]``
    read, and ``outputs`` arrays written (advantages, and returns unless 1)."""
    return 4 * ((per_step_inputs + outputs) * batch * horizon + batch)


def _gae_fn(method: str):
    return jax.jit(functools.partial(valuefn.gae, lambda_=LAMBDA, method=method))


def compare_shape(
    batch: int,
    horizon: int,
    *,
    repeats: int,
    torch,
    rlax,
    gae_methods: tuple[str, ...] | None = None,
) -> list[Figure]:
    """valuefn's GAE at one shape against the loops and rlax, timed in turn.

    ``gae_methods`` defaults to :func:`methods`."""
    gae_methods = gae_methods or methods()
    rewards, values, bootstrap, mask = make_inputs(batch, horizon)
    r, v, b, m = (jnp.asarray(x) for x in (rewards, values, bootstrap, mask))
    calls = {
        f"gae {method}": functools.partial(_gae_fn(method), r, v, GAMMA, b, mask=m)
        for method in gae_methods
    }
    gaps = jnp.asarray(with_gaps(mask))
    calls[GAPS] = functools.partial(_gae_fn("auto"), r, v, GAMMA, b, mask=gaps)
    loop = None
    if torch is not None:
        loop = "torch loop"
        torch_args = [torch.from_numpy(x) for x in (rewards, values, bootstrap, mask)]
        calls[loop] = lambda: torch_gae(torch, *torch_args)
    elif jax.default_backend() == "cpu":  # on an accelerator a host loop is no baseline
        loop = "numpy loop"
        calls[loop] = lambda: numpy_gae(rewards, values, bootstrap, mask)
    if rlax is not None:
        d = jnp.full((batch, horizon), GAMMA, jnp.float32)
        v_ext = jnp.concatenate([v, b[:, None]], axis=1)
        rlax_gae = jax.jit(
            jax.vmap(
                lambda r, d, v: rlax.truncated_generalized_advantage_estimation(
                    r, d, LAMBDA, v, True
                )
            )
        )
        with_returns = jax.jit(lambda r, d, v_ext: _with_returns(rlax_gae(r, d, v_ext), v_ext))
        advantages_only = jax.jit(lambda *args: _gae_fn("auto")(*args)[0])
        calls["rlax"] = functools.partial(rlax_gae, r, d, v_ext)
        calls["rlax + returns"] = functools.partial(with_returns, r, d, v_ext)
        calls[NO_MASK] = functools.partial(_gae_fn("auto"), r, v, d, b)
        calls[NO_MASK_ADVANTAGES] = functools.partial(advantages_only, r, v, d, b)

    # Back to back, as the update steps are timed: a JAX call that comes after
    # the PyTorch loop's 0.1 s turn, with XLA's threads idle, takes 1.3x to 2x
    # its time after another JAX call (see measure_many).
    with torch.no_grad() if torch is not None else contextlib.nullcontext():
        timings = measure_many(calls, repeats=repeats, back_to_back=True)

    shape = f"{batch}x{horizon}"
    steps = {"work": batch * horizon, "work_unit": "steps"}
    figures = [] if loop is None else [timed(f"gae {loop} {shape}", timings[loop], **steps)]
    # The loop does the same work whatever the mask holds.
    compared = [(f"gae {method}", loop, 2) for method in gae_methods] + [(GAPS, loop, 2)]
    if rlax is not None:
        figures.append(timed(f"gae rlax (vmapped) {shape}", timings["rlax"], **steps))
        compared += [(NO_MASK_ADVANTAGES, "rlax", 1), (NO_MASK, "rlax + returns", 2)]
    for name, baseline, outputs in compared:
        figures.append(
            timed(
                f"{name} {shape}",
                timings[name],
                against=None if baseline is None else (f"{baseline} {shape}", timings[baseline]),
                floor=MEMORY,
                floor_work=gae_bytes(batch, horizon, outputs=outputs),
                **steps,
            )
        )
    return figures


def compare_returns(batch: int, horizon: int, *, repeats: int, rlax) -> list[Figure]:
    """valuefn's other target kernels at one shape, on the inputs rlax takes
    (per-step discounts, no mask), against rlax's, vmapped over the batch.

    One-step targets are held against rlax's n-step returns with n = 1. Each pair
    is checked to agree before it is timed. Without rlax the kernels are timed
    against their floor alone. The n-step targets under the right-padded mask
    are held against the unmasked ones, and those under the left-padded mask
    against the right-padded ones."""
    rewards, values, bootstrap, mask = make_inputs(batch, horizon)
    r, v, b, m = (jnp.asarray(x) for x in (rewards, values, bootstrap, mask))
    d = jnp.full((batch, horizon), GAMMA, jnp.float32)
    partial = functools.partial
    n_step = f"n_step_targets n={RETURNS_N}"
    # name: (valuefn's function, its [B, T] and [B] inputs)
    ours = {
        "td_targets": (valuefn.td_targets, (r, v, d, b)),
        n_step: (partial(valuefn.n_step_targets, n=RETURNS_N), (r, v, d, b)),
        "lambda_returns auto": (partial(valuefn.lambda_returns, lambda_=LAMBDA), (r, v, d, b)),
        "discounted_returns auto": (valuefn.discounted_returns, (r, d, b)),
    }
    calls = {name: partial(jax.jit(fn), *args) for name, (fn, args) in ours.items()}
    masked_n_step = jax.jit(ours[n_step][0])  # the same n-step targets, given a mask
    calls[MASKED_N_STEP] = partial(masked_n_step, r, v, d, b, mask=m)
    calls[LEFT_N_STEP] = partial(masked_n_step, r, v, d, b, mask=m[:, ::-1])
    # name: (rlax's name, its function of one row, its inputs)
    theirs = {}
    if rlax is not None:
        next_values = jnp.concatenate([v[:, 1:], b[:, None]], axis=1)  # rlax's v_t
        rlax_n_step = rlax.n_step_bootstrapped_returns
        theirs = {
            "td_targets": ("rlax n-step n=1", partial(rlax_n_step, n=1), (r, d, next_values)),
            n_step: (
                f"rlax n-step n={RETURNS_N}",
                partial(rlax_n_step, n=RETURNS_N),
                (r, d, next_values),
            ),
            "lambda_returns auto": (
                "rlax lambda_returns",
                partial(rlax.lambda_returns, lambda_=LAMBDA),
                (r, d, next_values),
            ),
            "discounted_returns auto": (
                "rlax discounted_returns",
                rlax.discounted_returns,
                (r, d, b),
            ),
        }
    for name, (baseline, row, args) in theirs.items():
        calls[baseline] = partial(jax.jit(jax.vmap(row)), *args)
        # Misaligned inputs would differ by the size of a reward; rounding, by far less.
        np.testing.assert_allclose(
            calls[name](), calls[baseline](), rtol=1e-3, atol=1e-3, err_msg=f"{name}, {baseline}"
        )
    timings = measure_many(calls, repeats=repeats, back_to_back=True)
    shape = f"{batch}x{horizon}"

    def figure(name: str, call: str, against: tuple[str, str] | None, per_step_inputs: int):
        """``against``: the baseline's name and its call, or None."""
        return timed(
            f"{name} {shape}",
            timings[call],
            against=(f"{against[0]} {shape}", timings[against[1]]) if against else None,
            work=batch * horizon,
            work_unit="steps",
            floor=MEMORY,
            # The [B, T] inputs read, the targets written.
            floor_work=gae_bytes(batch, horizon, per_step_inputs=per_step_inputs, outputs=1),
        )

    figures = [
        figure(
            f"{name}, per-step discounts, no mask",
            name,
            (theirs[name][0], theirs[name][0]) if name in theirs else None,  # keyed by name
            len(args) - 1,
        )
        for name, (_, args) in ours.items()
    ]
    unmasked = (f"{n_step}, per-step discounts, no mask", n_step)
    masked = f"{n_step}, per-step discounts, right-padded mask"
    left = f"{n_step}, per-step discounts, left-padded mask"
    return [
        *figures,
        figure(masked, MASKED_N_STEP, unmasked, 4),
        figure(left, LEFT_N_STEP, (masked, MASKED_N_STEP), 4),
    ]


def _with_returns(advantages, extended_values):
    return advantages, advantages + extended_values[:, :-1]


def method_map(shapes, *, repeats: int, gae_methods: tuple[str, ...] | None = None) -> list[Figure]:
    """Each method of ``gae_methods`` (default :func:`methods`) but ``scan`` and
    ``auto`` against ``scan`` over shapes, no mask and a scalar discount."""
    mapped = [m for m in gae_methods or methods() if m not in ("scan", "auto")]
    figures = []
    for batch, horizon in shapes:
        rewards, values, bootstrap, _ = make_inputs(batch, horizon)
        r, v, b = (jnp.asarray(x) for x in (rewards, values, bootstrap))
        timings: dict[str, Timing] = measure_many(
            {
                method: functools.partial(_gae_fn(method), r, v, GAMMA, b)
                for method in ("scan", *mapped)
            },
            repeats=repeats,
        )
        shape = f"{batch}x{horizon}"
        figures += [
            timed(
                f"gae map: {method} {shape}",
                timings[method],
                against=(f"gae map: scan {shape}", timings["scan"]),
                work=batch * horizon,
                work_unit="steps",
                floor=MEMORY,
                floor_work=gae_bytes(batch, horizon, per_step_inputs=2),
            )
            for method in mapped
        ]
    return figures


def pallas_sweep(
    batch: int, horizon: int, configs, *, repeats: int
) -> Iterator[list[Figure] | Skipped]:
    """The ``pallas`` method's recursion alone (deltas and coefficients in, ``x``
    out) at each ``(backend, chunk, rows)`` of ``configs`` against its defaults,
    one configuration at a time (see :func:`_sweep`)."""
    rng = np.random.default_rng(0)
    deltas = jnp.asarray(rng.normal(size=(batch, horizon)).astype(np.float32))
    coeffs = jnp.full((batch, horizon), GAMMA * LAMBDA, jnp.float32)
    default = (_pallas_scan.BACKEND, _pallas_scan.CHUNK, _pallas_scan.ROWS)
    calls = {
        (backend, chunk, rows): functools.partial(
            _pallas_scan.reverse_linear_pallas,
            deltas,
            coeffs,
            chunk=chunk,
            rows=rows,
            backend=backend,
        )
        for backend, chunk, rows in dict.fromkeys((default, *configs))
    }
    return _sweep(
        calls,
        configs,
        default,
        options=lambda c: dict(zip(("backend", "chunk", "rows"), c, strict=True)),
        name=lambda c: f"pallas recursion, {c[0]}, chunks of {c[1]} steps, blocks of {c[2]} rows",
        shape=(batch, horizon),
        floor_work=4 * 3 * batch * horizon,  # deltas and coefficients read, x written
        repeats=repeats,
    )


def fused_sweep(
    batch: int, horizon: int, configs, *, repeats: int
) -> Iterator[list[Figure] | Skipped]:
    """GAE with a mask by ``method="pallas"``'s kernels that read the inputs
    (valuefn/_pallas_gae.py) at each ``(chunk, rows)`` of ``configs`` against
    their defaults, one configuration at a time (see :func:`_sweep`)."""
    rewards, values, bootstrap, mask = (jnp.asarray(x) for x in make_inputs(batch, horizon))
    default = (_pallas_gae.CHUNK, _pallas_gae.ROWS)
    calls = {
        (chunk, rows): functools.partial(
            _pallas_gae.gae_pallas,
            rewards,
            values,
            jnp.float32(GAMMA),
            bootstrap,
            jnp.float32(LAMBDA),
            mask,
            chunk=chunk,
            rows=rows,
        )
        for chunk, rows in dict.fromkeys((default, *configs))
    }
    return _sweep(
        calls,
        configs,
        default,
        options=lambda c: {"fused": True, "chunk": c[0], "rows": c[1]},
        name=lambda c: f"pallas gae with a mask, chunks of {c[0]} steps, blocks of {c[1]} rows",
        shape=(batch, horizon),
        floor_work=gae_bytes(batch, horizon),
        repeats=repeats,
    )


def _sweep(
    calls, configs, default, *, options, name, shape, floor_work, repeats
) -> Iterator[list[Figure] | Skipped]:
    """For each of ``configs`` in turn, ``calls[config]`` timed against
    ``calls[default]`` in the same rounds, as a section of one figure named
    ``name(config)``, or a :class:`Skipped` with the reason its kernels failed
    (every configuration, if the defaults fail). stderr names each configuration,
    by ``options(config)``, before it compiles. One configuration at a time: the
    suite saves each section as it comes, so a compiler that takes the process
    down costs the configurations from its own on, and stderr names it."""
    batch, horizon = shape
    label = f"{batch}x{horizon}"
    against = f"defaults {' '.join(map(str, default))} {label}"
    print(f"[sweeps] compiling {options(default)}", file=sys.stderr, flush=True)
    failure = _pallas_fails(calls[default], options(default))
    for config in configs:
        reason = failure
        if reason is None and config != default:
            print(f"[sweeps] compiling {options(config)}", file=sys.stderr, flush=True)
            reason = _pallas_fails(calls[config], options(config))
        if reason is not None:
            yield Skipped(name(config), reason)
            continue
        timings = measure_many(
            {c: calls[c] for c in dict.fromkeys((default, config))}, repeats=repeats
        )
        yield [
            timed(
                f"{name(config)} {label}",
                timings[config],
                against=(against, timings[default]),
                work=batch * horizon,
                work_unit="steps",
                floor=MEMORY,
                floor_work=floor_work,
            )
        ]


def run(quick: bool) -> Iterator[list[Figure] | Skipped]:
    """The target kernels against PyTorch and rlax, and GAE's method map (``quick``: tiny),
    yielded shape by shape so that a run cut short keeps what it measured."""
    (torch, left_out), rlax = baseline_torch("torch loop"), optional("rlax")
    yield from left_out
    # Every call but the PyTorch loop's takes milliseconds, so rounds are cheap,
    # and 27 of them give medians and counts of rounds won that hold.
    repeats = 3 if quick else 27
    # On a GPU, the Pallas kernels run once to see that they compile.
    failure = _pallas_fails() if jax.default_backend() == "gpu" else None
    if failure is not None:
        yield Skipped("pallas", failure)
    gae_methods = _methods(failure)
    for batch, horizon in QUICK_SHAPES if quick else SHAPES:
        yield compare_shape(
            batch, horizon, repeats=repeats, torch=torch, rlax=rlax, gae_methods=gae_methods
        )
        yield compare_returns(batch, horizon, repeats=repeats, rlax=rlax)
    if quick:
        grid = QUICK_MAP
    else:
        grid = MAP_CPU if jax.default_backend() == "cpu" else MAP_GPU
    for shape in grid:
        yield method_map([shape], repeats=repeats, gae_methods=gae_methods)
