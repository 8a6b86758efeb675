"""The machine's limits, measured in the same run as the figures held against them.

- ``memory bandwidth``: bytes per second of the faster of a large copy
  (``x <- x + 1`` in place: every byte read once and written once) and a large
  sum (read once). A memory-bound kernel (GAE, lambda-returns) can go no faster than the
  bytes it must move over this rate.
- ``matmul float32`` and ``matmul bfloat16``: FLOPs per second of a large square
  matmul ``C = A B`` (``2 N^3`` FLOPs) of operands in that dtype, accumulated
  and returned in float32, as the networks' layers multiply. A model's FLOPs
  over this rate is the floor of its update step. At JAX's default precision,
  as the models run, an NVIDIA GPU from Ampere on multiplies float32 operands
  as TF32: there ``matmul float32`` is the TF32 rate.
- ``peak bfloat16``: the datasheet's dense bf16 rate of a known accelerator
  (:data:`DATASHEET_BF16`), not measured; a model's FLOPs over it is the usual
  model FLOP utilisation (MFU). Absent on other devices.

:func:`limits` turns the figures into the rates the suite divides by: each at
its best repeat, the closest the machine came to its limit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from valuefn.bench.figures import Figure, measure, timed

MEMORY = "memory bandwidth"
MATMUL = {"float32": "matmul float32", "bfloat16": "matmul bfloat16"}
PEAK_BF16 = "peak bfloat16"
# Dense (no sparsity) bf16 FLOP/s of one chip from the vendors' datasheets. NVIDIA
# parts by the first substring of ``jax.Device.device_kind`` that matches (the
# PCIe and NVL parts before the SXM figure of their name, which also serves
# GH200), TPUs by the whole of it ("TPU v5 lite" is v5e, "TPU v5" v5p).
DATASHEET_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def datasheet_bf16(device_kind: str) -> float | None:
    """The datasheet dense bf16 FLOP/s of ``device_kind``, or None if unknown."""
    if device_kind.startswith("TPU"):
        return DATASHEET_BF16.get(device_kind)
    return next((rate for name, rate in DATASHEET_BF16.items() if name in device_kind), None)


def _sizes(quick: bool) -> tuple[int, int]:
    """Elements of the bandwidth array, and the matmul size N (both dtypes)."""
    if quick:
        return 1 << 20, 256
    if jax.default_backend() == "cpu":
        return 1 << 26, 2048  # 256 MiB: far past the caches
    return 1 << 28, 8192  # 1 GiB


def run(quick: bool) -> list[Figure]:
    """The machine's limits: memory bandwidth and matmul rates (``quick``: tiny sizes)."""
    elements, n = _sizes(quick)
    repeats = 3 if quick else 7
    nbytes = 4 * elements
    # The copy writes over its input (donated), so that no call pays for fresh pages.
    carry = {"x": jnp.zeros((elements,), jnp.float32)}
    increment = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    total = jax.jit(jnp.sum)

    def copy():
        carry["x"] = increment(carry["x"])
        return carry["x"]

    figures = [
        timed(
            f"{MEMORY} (copy {nbytes >> 20} MiB)",
            measure(copy, repeats=repeats),
            work=2 * nbytes,
            work_unit="B",
        ),
        timed(
            f"{MEMORY} (sum {nbytes >> 20} MiB)",
            measure(lambda: total(carry["x"]), repeats=repeats),
            work=nbytes,
            work_unit="B",
        ),
    ]
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for dtype in ("float32", "bfloat16"):
        key_a, key_b = jax.random.split(jax.random.key(0))
        a = jax.random.normal(key_a, (n, n), dtype)
        b = jax.random.normal(key_b, (n, n), dtype)
        figures.append(
            timed(
                f"{MATMUL[dtype]} ({n}x{n})",
                measure(lambda a=a, b=b: matmul(a, b), repeats=repeats),
                work=2.0 * n**3,
                work_unit="FLOP",
            )
        )
    return figures


def limits(figures: list[Figure]) -> dict[str, float]:
    """The best rate of each limit among ``figures``: ``{"memory bandwidth": bytes/s, ...}``."""
    best: dict[str, float] = {}
    for figure in figures:
        for limit in (MEMORY, *MATMUL.values()):
            if figure.name.startswith(limit) and figure.work is not None:
                best[limit] = max(best.get(limit, 0.0), figure.work / figure.min)
    peak = datasheet_bf16(jax.devices()[0].device_kind)
    if peak is not None:
        best[PEAK_BF16] = peak
    return best


def floor_fraction(figure: Figure, rates: dict[str, float]) -> float | None:
    """The figure as a fraction of its hardware limit: ``(floor_work / rate) / median``."""
    if figure.floor is None or figure.floor_work is None or figure.floor not in rates:
        return None
    return figure.floor_work / rates[figure.floor] / figure.median


def transformer_flops(
    *, d_model: int, num_layers: int, seq_len: int, tokens: float, training: bool = True
) -> float:
    """Matmul FLOPs of a GPT-2-style transformer over ``tokens`` tokens of length-``seq_len`` rows.

    Per token, a forward pass costs ``24 L d^2`` in the projections (QKV, output,
    and the MLP of width ``4 d``) and ``4 L T d`` in attention (``Q K^T`` and
    ``weights V`` over all ``T`` keys). That is PaLM's convention, which counts
    the whole ``T x T`` product though causal attention needs half of it; the
    critics compute blocks of 128 queries against the keys up to each block's
    end, three quarters of the product at T = 256, so the count is 3.7% above
    the reference critic's matmul work there and 1.3% above the 124M critic's.
    PyTorch is held to the same count. Training costs three times
    the forward pass (the backward pass computes gradients with respect to both
    activations and weights). Recomputation (remat) is not counted: this is the
    model's FLOPs, the numerator of model FLOP utilisation.

    References:
      Chowdhery et al., PaLM: Scaling Language Modeling with Pathways, 2022, appendix B.
    """
    forward = 24 * num_layers * d_model**2 + 4 * num_layers * seq_len * d_model
    return (3 if training else 1) * forward * tokens
