"""Value networks in Flax NNX: an MLP, a GPT-2-style transformer, and a head for your own backbone.

Every network maps inputs to one scalar value per position and ends in the same
value head: a ``Linear(hidden, 1)`` with float32 parameters, computed in float32
whatever dtype the body runs in, and initialised to zero weight and bias so the
critic predicts exactly 0 before training. The head is the attribute ``head``,
which is where :mod:`valuefn.train` finds it for the PopArt rescale.

Parameters are float32 in every network; ``dtype`` sets only the dtype of the
body's computation (e.g. ``jnp.bfloat16``).

On the CPU the dense layers, and a bf16 or float16 body's attention, define
their own reverse-mode derivatives (``jax.custom_vjp``: the gradients in the
layouts XLA's CPU GEMMs run fastest). JAX has no forward mode for those, so
``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` and forward-over-reverse
Hessian-vector products through a critic fail there; trace them inside
:func:`plain_autodiff`, which gives the same functions with JAX's own
derivatives.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from valuefn._checks import check_count, check_shape, concrete_or_none

Array = jax.Array

# GPT-2 initialisation: N(0, 0.02) weights and embeddings, zero biases; the
# projections back into the residual stream are scaled by 1/sqrt(2 * num_layers).
_INIT_STD = 0.02
_LAYER_NORM_EPS = 1e-5
# Causal attention runs over blocks of this many queries, each against the keys
# up to its last query only; see CausalSelfAttention.
_QUERY_BLOCK = 128
_PLAIN_AUTODIFF = contextvars.ContextVar("valuefn_plain_autodiff", default=False)


@contextlib.contextmanager
def plain_autodiff():
    """Critics traced inside use JAX's own derivatives, forward mode included.

    The same functions, without the CPU's hand-written reverse-mode derivatives
    (see the module's docstring): ``jax.jvp``, ``jax.jacfwd`` and
    ``jax.hessian`` work through them, and gradients run at autodiff's speed.
    It acts when a critic is traced: a function jitted and compiled outside the
    block keeps the derivatives it was traced with::

      with valuefn.plain_autodiff():
          _, tangent = jax.jvp(lambda x: model(x), (x,), (dx,))
    """
    token = _PLAIN_AUTODIFF.set(True)
    try:
        yield
    finally:
        _PLAIN_AUTODIFF.reset(token)


def _dot(a: Array, b: Array) -> Array:
    """``a @ b`` accumulated in float32 and returned in ``a``'s dtype.

    Asking for a float32 result of a bf16 product is what lets XLA's CPU
    backend use its native bf16 GEMM; a bf16 result makes it convert both
    operands to float32 first.
    """
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def _affine(x: Array, kernel: Array, bias: Array) -> Array:
    """``x [..., K] @ kernel [K, N] + bias [N]``, with gradients laid out for the CPU.

    The gradients are the usual ones, ``dx = g kernel^T``,
    ``dkernel = x^T g`` and ``dbias = sum g`` (summed over all leading axes),
    computed in the forms XLA's CPU backend runs fastest:

    - ``x^T g`` with its contracting axis leading (a transposed left operand)
      goes to a generic GEMM about half as fast as the library kernels used for
      ``A [M, K] @ B [K, N]``; so the narrower of ``x`` and ``g`` is transposed
      once into a real array (see :func:`_transposed`) and multiplied in that
      form.
    - Left to autodiff, a bf16 bias gradient is summed through a generic tree
      reduction (``reduce-window``) ten to twenty times slower than the library
      reduction a float32 row sum gets.

    Products accumulate in float32 (see :func:`_dot`).
    """
    return _dot(x, kernel) + bias


def _affine_fwd(x: Array, kernel: Array, bias: Array) -> tuple[Array, tuple[Array, Array]]:
    return _affine(x, kernel, bias), (x, kernel)


def _affine_bwd(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array, Array]:
    x, kernel = residuals
    rows_x = x.reshape(-1, x.shape[-1])  # [M, K]
    rows_grad = grad.reshape(-1, grad.shape[-1])  # [M, N]
    if rows_x.shape[1] <= rows_grad.shape[1]:
        grad_kernel = _dot(_transposed(rows_x), rows_grad)
    else:
        grad_kernel = jax.lax.optimization_barrier(_dot(_transposed(rows_grad), rows_x)).T
    grad_bias = jnp.sum(rows_grad, axis=0, dtype=jnp.float32)
    return (
        _dot(grad, kernel.T),
        grad_kernel.astype(kernel.dtype),
        grad_bias.astype(kernel.dtype),
    )


_affine.defvjp(_affine_fwd, _affine_bwd)


def _transposed(x: Array) -> Array:
    """``x [..., M, N]`` with its last two axes swapped, as a real, row-major array.

    A plain ``swapaxes`` reaches XLA as a change of layout, which its CPU
    backend folds into the dot that reads it. That dot then has a column-major
    operand: the library GEMMs reject it, and a bf16 one is computed in
    float32 at half the rate. Transposing ``[..., a, M / a, N]`` to
    ``[..., N, a, M / a]`` and merging the last two axes gives the same array
    with an ordinary layout, and an ``optimization_barrier`` keeps XLA's
    simplifier from folding it back.
    """
    *lead, m, n = x.shape
    a, k = math.gcd(m, 64), len(lead)
    split = x.reshape(*lead, a, m // a, n).transpose(*range(k), k + 2, k, k + 1)
    return jax.lax.optimization_barrier(split.reshape(*lead, n, m))


class _Dense(nnx.Linear):
    """``nnx.Linear`` (same parameters, initialisers and results) computed for the CPU.

    On the CPU backend ``x @ kernel + bias`` runs through :func:`_affine`: the
    weight gradient in the canonical GEMM layout and the bias gradient summed in
    float32. Elsewhere, and inside :func:`plain_autodiff`, it is ``nnx.Linear``
    itself.
    """

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        plain = (
            jax.default_backend() != "cpu"
            or _PLAIN_AUTODIFF.get()
            or self.bias is None
            or (self.precision, self.preferred_element_type, out_sharding) != (None, None, None)
        )
        if plain:
            return super().__call__(inputs, out_sharding=out_sharding)
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], self.bias[...]), dtype=self.dtype
        )
        return _affine(inputs, kernel, bias)


def _zero_head(in_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.zeros_init(),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _apply_head(head: nnx.Linear, features: Array) -> Array:
    """``features [..., H] -> values [...]`` in float32."""
    return head(features.astype(jnp.float32))[..., 0]


def _check_features(name: str, x: Array, features: int) -> Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != features:
        raise ValueError(f"{name} must have shape [..., {features}], got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


class MLPValue(nnx.Module):
    """Multi-layer perceptron critic ``[..., F] -> [...]``.

    ``V(x) = w^T h_L(x) + b`` with ``h_l = activation(W_l h_{l-1} + b_l)``,
    ``h_0 = x``; the head ``(w, b)`` starts at zero.

    Args:
      in_features: size ``F`` of the last input axis.
      hidden_sizes: widths of the hidden layers (may be empty: a linear critic).
      activation: elementwise nonlinearity between layers.
      dtype: computation dtype of the hidden layers; the head is float32.
      rngs: random streams for the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        *,
        activation: Callable[[Array], Array] = jax.nn.tanh,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_count("in_features", in_features, numpy=False)
        if not isinstance(hidden_sizes, Sequence):
            raise ValueError(f"hidden_sizes must be a sequence of widths, got {hidden_sizes!r}")
        for i, size in enumerate(hidden_sizes):
            check_count(f"hidden_sizes[{i}]", size, numpy=False)
        self.in_features = in_features
        self.activation = activation
        sizes = (in_features, *hidden_sizes)
        self.layers = nnx.List(
            [
                _Dense(n_in, n_out, dtype=dtype, rngs=rngs)
                for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.head = _zero_head(sizes[-1], rngs)

    def __call__(self, x: Array) -> Array:
        """``x [..., F]`` float -> values ``[...]`` float32."""
        x = _check_features("x", x, self.in_features)
        for layer in self.layers:
            x = self.activation(layer(x))
        return _apply_head(self.head, x)


class ValueHead(nnx.Module):
    """A zero-initialised float32 value head on a user's own NNX backbone.

    ``V(inputs) = w^T backbone(inputs) + b``; ``backbone(*args, **kwargs)`` must
    return features ``[..., hidden_size]`` and the result is ``[...]`` float32.

    Args:
      backbone: any callable NNX module (its parameters are trained with the head).
      hidden_size: size of the backbone's last output axis.
      rngs: random streams (the head itself starts at zero).
    """

    def __init__(self, backbone: nnx.Module, hidden_size: int, *, rngs: nnx.Rngs):
        check_count("hidden_size", hidden_size, numpy=False)
        self.backbone = backbone
        self.hidden_size = hidden_size
        self.head = _zero_head(hidden_size, rngs)

    def __call__(self, *args, **kwargs) -> Array:
        """Backbone inputs -> values ``[...]`` float32."""
        features = self.backbone(*args, **kwargs)
        if features.ndim < 1 or features.shape[-1] != self.hidden_size:
            raise ValueError(
                f"backbone output must have shape [..., {self.hidden_size}] (hidden_size), "
                f"got {features.shape}"
            )
        return _apply_head(self.head, features)


def _gpt2_linear(
    in_features: int,
    out_features: int,
    *,
    num_layers: int | None = None,
    dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """A Linear with N(0, 0.02) weights; with ``num_layers``, a projection into the
    residual stream, whose weights are scaled by ``1 / sqrt(2 * num_layers)``."""
    std = _INIT_STD if num_layers is None else _INIT_STD / math.sqrt(2 * num_layers)
    return _Dense(
        in_features,
        out_features,
        dtype=dtype,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention ``[B, T, D] -> [B, T, D]`` with a fused QKV projection.

    Per head, ``softmax(Q K^T / sqrt(D/H) + causal) V``, with the scores and the
    softmax in float32. It is computed in blocks of 128 queries: a block needs
    the keys up to its last query only, so most of the masked upper triangle of
    ``Q K^T`` is never computed (a quarter of it at T = 256), and each block
    normalises its ``[.., D/H]`` output by the softmax denominator instead of
    its ``[.., T]`` weights. The result is the same as the one-matrix form.

    On a GPU it calls :func:`jax.nn.dot_product_attention` instead: cuDNN's
    fused (flash) attention for bf16 and float16 bodies where cuDNN accepts the
    inputs, XLA's one-matrix form otherwise.

    With ``keys`` (bool ``[B, T]``), a query sees the earlier keys marked True
    and itself: padding is never attended to, and a padding position, which
    sees only itself, stays finite.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, num_layers: int, dtype: Any, rngs: nnx.Rngs
    ):
        self.num_heads = num_heads
        self.qkv = _gpt2_linear(d_model, 3 * d_model, dtype=dtype, rngs=rngs)
        self.out = _gpt2_linear(d_model, d_model, num_layers=num_layers, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, keys: Array | None = None) -> Array:
        batch, length, d_model = x.shape
        head_dim = d_model // self.num_heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, head_dim)
        if _fused_attention():
            attended = _dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], keys)
            return self.out(attended.reshape(batch, length, d_model))
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # [3, B, H, T, D/H]
        q, k, v = (x[0] for x in jnp.split(qkv, 3))
        q = q * (1 / math.sqrt(head_dim))
        # Split into blocks, not sliced: the gradient of a split is one
        # concatenate, where the gradients of slices are padded to full length
        # and summed, a pass over [B, H, T, D/H] per block.
        query_blocks = _query_blocks(length)
        sizes = [stop - start for start, stop in query_blocks]
        q_blocks, k_blocks, v_blocks = (jax.lax.split(x, sizes, axis=2) for x in (q, k, v))
        blocks = [
            _causal_block(
                q_blocks[i],
                jnp.concatenate(k_blocks[: i + 1], axis=2),
                jnp.concatenate(v_blocks[: i + 1], axis=2),
                start,
                None if keys is None else keys[:, :stop],
            )
            for i, (start, stop) in enumerate(query_blocks)
        ]
        attended = jnp.concatenate(blocks, axis=2).transpose(0, 2, 1, 3)  # [B, T, H, D/H]
        return self.out(attended.reshape(batch, length, d_model))


def _fused_attention() -> bool:
    """Whether attention goes through ``jax.nn.dot_product_attention`` (on a GPU)."""
    return jax.default_backend() == "gpu"


def _dot_product_attention(q: Array, k: Array, v: Array, keys: Array | None) -> Array:
    """Causal ``[B, T, H, D]`` attention by cuDNN where it takes the inputs, else by XLA.

    cuDNN's fused attention takes half-precision inputs only, and
    ``jax.nn.dot_product_attention`` raises while tracing when cuDNN is missing
    or rejects the shapes or the mask; either way XLA's form computes the same
    function.
    """
    mask = None if keys is None else _visible_keys(keys, 0, q.shape[1])[:, None]
    if q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, implementation="cudnn"
            )
        except (RuntimeError, ValueError, NotImplementedError):
            pass
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


def _visible_keys(keys: Array, offset: int, queries: int) -> Array:
    """``[B, Q, K]``: the keys marked in ``keys`` (``[B, K]``), and each query's own
    position (``offset + q``), which a padding query must see to stay finite."""
    own = jnp.arange(keys.shape[1])[None, :] == offset + jnp.arange(queries)[:, None]
    return keys[:, None, :] | own


def _query_blocks(length: int) -> list[tuple[int, int]]:
    return [(start, min(start + _QUERY_BLOCK, length)) for start in range(0, length, _QUERY_BLOCK)]


def _causal_block(q: Array, k: Array, v: Array, offset: int, keys: Array | None = None) -> Array:
    """Queries ``offset .. offset + Q - 1`` attending causally to keys ``0 .. K - 1``.

    Args:
      q: ``[B, H, Q, D]``, already scaled by ``1 / sqrt(D)``.
      k, v: ``[B, H, K, D]`` with ``K = offset + Q``.
      offset: position of the first query.
      keys: optional bool ``[B, K]``: the keys that may be seen (besides a
        query's own position); None for all.

    Returns:
      ``sum_k softmax_k(q k^T) v`` as ``[B, H, Q, D]`` in ``v``'s dtype.

    In float32 (or wider) autodiff gives the gradient. In a bf16 or float16
    body the gradient is written out (:func:`_causal_block_bwd`) so that each
    of its products is a row-major matmul in the body's dtype accumulated in
    float32, as flash attention computes it: autodiff hands XLA float32
    cotangents and transposed operands, which its CPU backend multiplies in
    float32. (In float32 the written-out gradient measured slower: XLA's own
    GEMM takes transposed float32 operands without a copy.)
    """
    if jnp.finfo(v.dtype).bits >= 32 or _PLAIN_AUTODIFF.get():
        return _causal_block_fwd(q, k, v, offset, keys)[0]
    return _narrow_causal_block(q, k, v, offset, keys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _narrow_causal_block(q: Array, k: Array, v: Array, offset: int, keys: Array | None) -> Array:
    return _causal_block_fwd(q, k, v, offset, keys)[0]


def _causal_block_fwd(q: Array, k: Array, v: Array, offset: int, keys: Array | None):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    visible = jnp.arange(k.shape[2])[None, :] <= offset + jnp.arange(q.shape[2])[:, None]
    if keys is not None:
        visible = visible & _visible_keys(keys, offset, q.shape[2])[:, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    # The row maximum subtracted before exp cancels in the softmax: no gradient.
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    unnormalised = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = (unnormalised / total).astype(v.dtype)
    return out, (q, k, v, weights, total, unnormalised)


def _causal_block_bwd(offset: int, residuals, grad: Array):
    del offset  # the mask is in the weights: 0 where a key is not visible
    q, k, v, weights, total, unnormalised = residuals
    grad = grad.astype(jnp.float32)
    grad_unnormalised = (grad / total).astype(v.dtype)  # [B, H, Q, D]
    grad_total = -jnp.sum(grad * unnormalised, axis=-1, keepdims=True) / total**2
    grad_probs = jnp.einsum(
        "bhqd,bhkd->bhqk", grad_unnormalised, v, preferred_element_type=jnp.float32
    )
    grad_v = _dot(_transposed(weights.astype(v.dtype)), grad_unnormalised)
    grad_scores = ((grad_probs + grad_total) * weights).astype(v.dtype)
    grad_q = _dot(grad_scores, k)
    grad_k = _dot(_transposed(grad_scores), q)
    return grad_q.astype(q.dtype), grad_k.astype(k.dtype), grad_v, None


_narrow_causal_block.defvjp(_causal_block_fwd, _causal_block_bwd)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    The MLP is ``Linear(D, 4D) -> GELU (tanh form) -> Linear(4D, D)``.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, num_layers: int, dtype: Any, rngs: nnx.Rngs
    ):
        self.ln_attn = nnx.LayerNorm(d_model, epsilon=_LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.attn = CausalSelfAttention(
            d_model, num_heads, num_layers=num_layers, dtype=dtype, rngs=rngs
        )
        self.ln_mlp = nnx.LayerNorm(d_model, epsilon=_LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.fc = _gpt2_linear(d_model, 4 * d_model, dtype=dtype, rngs=rngs)
        self.proj = _gpt2_linear(
            4 * d_model, d_model, num_layers=num_layers, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: Array, keys: Array | None = None) -> Array:
        x = x + self.attn(self.ln_attn(x), keys)
        return x + self.proj(jax.nn.gelu(self.fc(self.ln_mlp(x)), approximate=True))


def _run_block(block: Block, x: Array, keys: Array | None) -> Array:
    return block(x, keys)


def _stacked_blocks(num_layers: int, rngs: nnx.Rngs, **block_args) -> Block:
    """``num_layers`` blocks as one :class:`Block` whose arrays have a leading layer axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(num_layers=num_layers, rngs=rngs, **block_args)

    return make(rngs)


class TransformerValue(nnx.Module):
    """GPT-2-style causal transformer critic: tokens ``[B, T]`` -> values ``[B, T]``.

    ``h_0 = E[tokens] + P[0:T]`` (with a padding mask, ``P`` at the real tokens'
    own positions); ``num_layers`` pre-LayerNorm blocks of causal
    multi-head self-attention and a GELU MLP of width ``4 * d_model``; a final
    LayerNorm; then the float32 zero-initialised head ``Linear(d_model, 1)``.
    ``values[b, t]`` depends on ``tokens[b, :t + 1]`` only. Every Linear has a
    bias; at vocab 1024, d_model 256, 4 layers, 4 heads, max_len 256 this is
    3,487,489 parameters, as in the same model written in PyTorch.

    Args:
      vocab_size: number of token ids.
      d_model: residual width, divisible by ``num_heads``.
      num_layers: number of blocks.
      num_heads: attention heads per block.
      max_len: longest sequence (number of learned positions).
      dtype: computation dtype of the body (e.g. ``jnp.bfloat16``); parameters,
        LayerNorm statistics, softmax and the head stay float32.
      remat: recompute each block's activations in the backward pass instead of
        storing them (``nnx.remat``), for long sequences. With unrolled blocks
        XLA's CPU backend may schedule the recomputation where the activations
        would have been stored, and then saves nothing; with ``scan_layers``
        the backward loop recomputes one block at a time, which lowers the
        peak (on the CPU, 2.9x for the reference critic's update step at
        T = 4096).
      scan_layers: keep the blocks' parameters stacked along a leading layer
        axis and run the blocks by one ``nnx.scan``, so that XLA compiles one
        block instead of ``num_layers``: the compile time stops growing with
        depth. The same function; the parameters are laid out (and drawn at
        initialisation) differently, so checkpoints of the two layouts do not
        mix.
      pad_id: the token id that marks padding, or None (the default) for none.
        With it, every call masks the positions holding it as ``mask`` does
        (see ``__call__``), so a critic trained through
        :func:`valuefn.make_update_step`, which passes the tokens only, ignores
        padding. Use it only where the id never stands for a real token (a
        tokenizer whose padding is its end-of-sequence token needs ``mask``).
      rngs: random streams for the initialisation.

    References:
      Radford et al., Language Models are Unsupervised Multitask Learners, 2019.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        dtype: Any = jnp.float32,
        remat: bool = False,
        scan_layers: bool = False,
        pad_id: int | None = None,
        rngs: nnx.Rngs,
    ):
        for name, size in [
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("max_len", max_len),
        ]:
            check_count(name, size, numpy=False)
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if pad_id is not None and not (
            isinstance(pad_id, int) and not isinstance(pad_id, bool) and 0 <= pad_id < vocab_size
        ):
            raise ValueError(
                f"pad_id must be None or an int in [0, vocab_size={vocab_size}), got {pad_id!r}"
            )
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.max_len = max_len
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        init = nnx.initializers.normal(_INIT_STD)
        self.token_embed = nnx.Embed(
            vocab_size, d_model, dtype=dtype, embedding_init=init, rngs=rngs
        )
        self.position_embed = nnx.Embed(
            max_len, d_model, dtype=dtype, embedding_init=init, rngs=rngs
        )
        block_args = dict(d_model=d_model, num_heads=num_heads, dtype=dtype)
        if scan_layers:
            self.blocks = _stacked_blocks(num_layers, rngs, **block_args)
        else:
            self.blocks = nnx.List(
                [Block(num_layers=num_layers, rngs=rngs, **block_args) for _ in range(num_layers)]
            )
        self.ln_final = nnx.LayerNorm(d_model, epsilon=_LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.head = _zero_head(d_model, rngs)

    def __call__(self, tokens: Array, mask: Array | None = None) -> Array:
        """``tokens [B, T]`` integer ids, ``T <= max_len`` -> values ``[B, T]`` float32.

        Ids must lie in ``[0, vocab_size)``; known ones outside raise a
        ``ValueError``. Under ``jit`` they cannot be checked, and they act as
        ``jnp.take`` makes them: an id past the end embeds as NaN, which the
        attention carries to every value of its row (and the update step then
        skips the batch), and a negative id counts from the end.

        Without ``mask`` (and without ``pad_id``) padding is input like any
        other token, and left padding moves the positions the other tokens are
        seen at. ``mask`` (bool or 0/1 ``[B, T]``, like a Hugging Face
        ``attention_mask``) marks the real tokens: they are numbered from 0 in
        order for their position embeddings, and no position attends to a
        masked one. The values at real tokens are then those of the sequence
        without its padding, wherever the padding lies (left, right or
        between turns), and the values at padding are finite and meaningless.
        It takes the place of ``tokens != pad_id``.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.max_len:
            raise ValueError(
                f"tokens must have shape [B, T] with 1 <= T <= max_len={self.max_len}, "
                f"got {tokens.shape}"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
        known = concrete_or_none(tokens)
        if (
            known is not None
            and known.size
            and not (0 <= known.min() and known.max() < self.vocab_size)
        ):
            raise ValueError(
                f"tokens must lie in [0, vocab_size={self.vocab_size}), got ids from "
                f"{int(known.min())} to {int(known.max())}"
            )
        if mask is None and self.pad_id is not None:
            mask = tokens != self.pad_id
        if mask is None:
            positions = jnp.arange(tokens.shape[1])
        else:
            mask = check_shape("mask", jnp.asarray(mask), tokens.shape)
            if not (mask.dtype == bool or jnp.issubdtype(mask.dtype, jnp.integer)):
                raise ValueError(f"mask must be bool or integer, got {mask.dtype}")
            mask = mask.astype(bool)
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        x = self.token_embed(tokens) + self.position_embed(positions)
        run_block = nnx.remat(_run_block) if self.remat else _run_block
        if self.scan_layers:
            scanned = nnx.scan(run_block, in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
            x = scanned(self.blocks, x, mask)
        else:
            for block in self.blocks:
                x = run_block(block, x, mask)
        return _apply_head(self.head, self.ln_final(x))


def count_parameters(model: nnx.Module) -> int:
    """Total number of scalar parameters (``nnx.Param`` entries) in ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
