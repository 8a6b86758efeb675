"""GAE under a mask as maps of the state walked back in time.

The state is ``(A, V)``: the advantage and the value at the next valid step,
``(0, bootstrap)`` past the end. A valid step maps it to
``(r - v + gamma (V + lambda A), v)``, with ``gamma`` 0 at a truncation, where
the final value enters through ``r``; a masked step passes it through. Each
step is the map ``(A, V) -> (a A + b V + e, d V + f)``, and two such maps
compose into one of the same form. The blocked scan of ``gae(method="scan")``
(valuefn/targets.py) and the Pallas kernels of ``method="pallas"``
(valuefn/_pallas_gae.py) both walk these maps.

Per step the inputs are ``valid``, ``gain = r - v`` (plus ``gamma`` times the
final value at a truncation), ``value = v``, ``chain`` (the discount into the
next valid step, 0 at a truncation) and ``lam``; ``valid`` may be the constant
True, for no mask.
"""

from __future__ import annotations

import jax.numpy as jnp


def where(valid, x, y):
    """``jnp.where`` that folds when ``valid`` is the constant True (no mask)."""
    return x if valid is True else jnp.where(valid, x, y)


def step_map(valid, gain, value, chain, lam):
    """Step t as ``(a, b, e, d, f)``: ``(A, V) -> (a A + b V + e, d V + f)``."""
    return (
        where(valid, lam * chain, 1.0),
        where(valid, chain, 0.0),
        where(valid, gain, 0.0),
        where(valid, 0.0, 1.0),
        where(valid, value, 0.0),
    )


def compose(earlier, later):
    """The map that applies ``later``, then ``earlier``."""
    a0, b0, e0, d0, f0 = earlier
    a1, b1, e1, d1, f1 = later
    return a0 * a1, a0 * b1 + b0 * d1, a0 * e1 + b0 * f1 + e0, d0 * d1, d0 * f1 + f0


def apply(step, state):
    """``step``'s map applied to the state ``(A, V)``."""
    a, b, e, d, f = step
    advantage, value = state
    return a * advantage + b * value + e, d * value + f


def walk(valid, gain, value, chain, lam, state):
    """Step t walked from the state after it: ``(A_t, state at t)``, where
    ``A_t`` is the advantage step t would have if valid."""
    advantage_next, value_next = state
    advantage = gain + chain * (value_next + lam * advantage_next)
    return advantage, (where(valid, advantage, advantage_next), where(valid, value, value_next))
