"""Value networks: shapes, zero-init heads, dtypes, and forward passes against NumPy."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import valuefn
from valuefn import networks
from valuefn.networks import Block

VOCAB, D_MODEL, LAYERS, HEADS, MAX_LEN = 50, 32, 2, 4, 12


def tiny_transformer(seed=0, **kwargs):
    return valuefn.TransformerValue(
        VOCAB,
        d_model=D_MODEL,
        num_layers=LAYERS,
        num_heads=HEADS,
        max_len=MAX_LEN,
        rngs=nnx.Rngs(seed),
        **kwargs,
    )


def randomise_head(model, seed=1):
    """Gives the zero-initialised head random weights, so outputs depend on the body."""
    rng = np.random.default_rng(seed)
    model.head.kernel[...] = jnp.asarray(rng.normal(size=model.head.kernel.shape), jnp.float32)
    model.head.bias[...] = jnp.asarray(rng.normal(size=(1,)), jnp.float32)


@nnx.jit
def run(model, inputs):
    """The model's forward pass, compiled (eager op-by-op dispatch is slow)."""
    return model(inputs)


def tokens(batch=3, length=MAX_LEN, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


def numpy_params(model):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model)))


def numpy_layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def numpy_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def numpy_linear(x, p):
    return x @ p["kernel"] + p["bias"]


def numpy_transformer(params, toks, num_heads, mask=None):
    """GPT-2 forward pass written from the paper's description, one head at a time.

    With ``mask`` (``[B, T]``, True on real tokens) the real tokens take positions
    0, 1, ... in order and a query attends to the real keys up to it and to itself.
    """
    toks = np.asarray(toks)
    length = toks.shape[1]
    if mask is None:
        positions = np.arange(length)
        visible = np.tril(np.ones((length, length), bool))
    else:
        mask = np.asarray(mask, bool)
        positions = np.zeros(toks.shape, np.int64)
        visible = np.zeros((toks.shape[0], length, length), bool)
        for b in range(toks.shape[0]):
            seen = 0
            for t in range(length):
                seen += mask[b, t]
                positions[b, t] = max(seen - 1, 0)
                for key in range(t + 1):
                    visible[b, t, key] = mask[b, key] or key == t
    x = params["token_embed"]["embedding"][toks] + params["position_embed"]["embedding"][positions]
    d_model = x.shape[-1]
    head_dim = d_model // num_heads
    for i in sorted(params["blocks"]):
        p = params["blocks"][i]
        h = numpy_layer_norm(x, p["ln_attn"])
        qkv = numpy_linear(h, p["attn"]["qkv"])
        q, k, v = np.split(qkv, 3, axis=-1)
        heads = []
        for head in range(num_heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[..., cols] @ np.swapaxes(k[..., cols], -1, -2) / math.sqrt(head_dim)
            scores = np.where(visible, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            heads.append(weights @ v[..., cols])
        x = x + numpy_linear(np.concatenate(heads, -1), p["attn"]["out"])
        h = numpy_gelu(numpy_linear(numpy_layer_norm(x, p["ln_mlp"]), p["fc"]))
        x = x + numpy_linear(h, p["proj"])
    x = numpy_layer_norm(x, params["ln_final"])
    return numpy_linear(x, params["head"])[..., 0]


def test_reference_config_has_3487489_parameters():
    model = nnx.eval_shape(
        lambda: valuefn.TransformerValue(
            1024, d_model=256, num_layers=4, num_heads=4, max_len=256, rngs=nnx.Rngs(0)
        )
    )
    d, vocab, length, layers = 256, 1024, 256, 4
    per_block = (
        2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    )
    expected = vocab * d + length * d + layers * per_block + 2 * d + d + 1
    assert expected == 3_487_489
    shapes = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(math.prod(x.shape) for x in shapes) == 3_487_489
    assert valuefn.count_parameters(model) == 3_487_489


@pytest.mark.parametrize("weight_scale", [1.0, 20.0])
def test_transformer_matches_numpy_gpt2_forward(weight_scale):
    # At the initial scale the GELU's inputs are about 0.1, where its tanh form and
    # its exact form agree to 1e-7; trained-size weights tell them apart.
    model = tiny_transformer()
    randomise_head(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda w: w * weight_scale if w.ndim == 2 else w, params))
    toks = tokens()
    expected = numpy_transformer(numpy_params(model), toks, HEADS)
    np.testing.assert_allclose(np.asarray(run(model, toks)), expected, rtol=1e-4, atol=1e-4)


def test_initial_weights_follow_gpt2():
    params = numpy_params(tiny_transformer(seed=5))
    for block in params["blocks"].values():
        for layer, std in [
            (block["attn"]["qkv"], 0.02),
            (block["fc"], 0.02),
            # Projections into the residual stream: scaled by 1 / sqrt(2 L).
            (block["attn"]["out"], 0.02 / math.sqrt(2 * LAYERS)),
            (block["proj"], 0.02 / math.sqrt(2 * LAYERS)),
        ]:
            np.testing.assert_allclose(layer["kernel"].std(), std, rtol=0.1)
            np.testing.assert_array_equal(layer["bias"], 0.0)


def test_attention_in_query_blocks_matches_numpy(monkeypatch):
    """Blocks of 5 queries over T = 12: full blocks, a short last block, the same answer."""
    monkeypatch.setattr(networks, "_QUERY_BLOCK", 5)
    jax.clear_caches()  # predict is jitted: trace it with these blocks
    model = tiny_transformer()
    randomise_head(model)
    toks = tokens()
    expected = numpy_transformer(numpy_params(model), toks, HEADS)
    graphdef, params = nnx.split(model)
    np.testing.assert_allclose(
        np.asarray(valuefn.predict(graphdef, params, toks)), expected, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("query_block", [128, 5])
def test_fused_attention_path_matches_numpy_and_the_block_gradients(monkeypatch, query_block):
    """The GPU path (jax.nn.dot_product_attention), forced on this backend, against the
    blocks: one block, and blocks of 5 + 5 + 2 queries over T = 12."""
    monkeypatch.setattr(networks, "_QUERY_BLOCK", query_block)
    jax.clear_caches()  # predict is jitted: trace it with these blocks
    model = tiny_transformer()
    randomise_head(model)
    toks = tokens()
    graphdef, params = nnx.split(model)
    expected = numpy_transformer(numpy_params(model), toks, HEADS)

    def loss(params):
        return jnp.sum(jnp.sin(valuefn.predict(graphdef, params, toks)))

    block_grads = jax.grad(loss)(params)
    monkeypatch.setattr(networks, "_fused_attention", lambda: True)
    jax.clear_caches()  # predict is jitted: trace it anew
    np.testing.assert_allclose(
        np.asarray(valuefn.predict(graphdef, params, toks)), expected, rtol=1e-4, atol=1e-4
    )
    fused_grads = jax.grad(loss)(params)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(block_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + np.max(np.abs(b))))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("offset", [0, 3])
def test_written_out_attention_gradient_equals_autodiff(offset, masked):
    """The narrow-body attention block's custom VJP, run in float32, against jax.grad,
    with every key visible and with some keys masked out."""
    rng = np.random.default_rng(offset)
    q = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 3, offset + 4, 5)), jnp.float32) for _ in range(2))
    keys = jnp.asarray(rng.random((2, offset + 4)) < 0.5) if masked else None
    probe = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(block, q, k, v):
        return jnp.sum(jnp.sin(block(q, k, v, offset, keys)) * probe)

    written = jax.jit(jax.grad(lambda *a: loss(networks._narrow_causal_block, *a), (0, 1, 2)))
    autodiff = jax.grad(lambda *a: loss(networks._causal_block, *a), (0, 1, 2))
    for got, want in zip(written(q, k, v), autodiff(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("narrow", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("query_block", [128, 5])
def test_narrow_body_gradients_follow_the_float32_ones(monkeypatch, query_block, narrow):
    """The same parameters through a bf16 (or float16) and a float32 body: rounding only."""
    monkeypatch.setattr(networks, "_QUERY_BLOCK", query_block)
    jax.clear_caches()
    toks = tokens()
    grads = []
    for dtype in (jnp.float32, narrow):
        model = tiny_transformer(dtype=dtype)
        randomise_head(model)
        graphdef, params = nnx.split(model)
        grads.append(
            jax.grad(lambda p, g=graphdef: jnp.sum(jnp.sin(valuefn.predict(g, p, toks))))(params)
        )
    for exact, rounded in zip(*map(jax.tree.leaves, grads), strict=True):
        assert rounded.dtype == jnp.float32
        exact, rounded = np.asarray(exact), np.asarray(rounded)
        assert np.max(np.abs(rounded - exact)) <= 0.1 * np.max(np.abs(exact)) + 1e-6


def test_fused_attention_path_in_bf16_matches_the_block_form(monkeypatch):
    """bf16 tries cuDNN first; where cuDNN is absent (here) XLA computes the same values."""
    model = tiny_transformer(dtype=jnp.bfloat16)
    randomise_head(model)
    toks = tokens()
    graphdef, params = nnx.split(model)
    blocks = np.asarray(valuefn.predict(graphdef, params, toks))
    monkeypatch.setattr(networks, "_fused_attention", lambda: True)
    jax.clear_caches()
    fused = np.asarray(valuefn.predict(graphdef, params, toks))
    assert np.all(np.isfinite(fused))
    np.testing.assert_allclose(fused, blocks, rtol=0.05, atol=0.05 * np.max(np.abs(blocks)))


@pytest.mark.parametrize(
    ("dtype", "pad_id", "cudnn_calls"),
    [
        (jnp.bfloat16, None, ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]),
        # The padding mask reaches cuDNN as an additive bias, beside its causal mask.
        (
            jnp.bfloat16,
            0,
            ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"],
        ),
        (jnp.float32, 0, []),  # cuDNN's fused attention takes half precision only
    ],
)
def test_update_step_lowered_for_an_nvidia_gpu_attends_by_cudnn(
    monkeypatch, dtype, pad_id, cudnn_calls
):
    # Lowered for CUDA from this machine, where JAX finds no cuDNN: given a
    # version, it builds the fused attention's calls, so a bf16 critic, with a
    # padding mask or without, does not fall back to XLA's attention on a GPU.
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(networks, "_fused_attention", lambda: True)
    optimizer = optax.adam(1e-3)
    graphdef, state = valuefn.init_train_state(
        tiny_transformer(dtype=dtype, pad_id=pad_id), optimizer
    )
    step = valuefn.make_update_step(graphdef, optimizer)
    batch = valuefn.Batch(
        inputs=tokens(batch=2), targets=jnp.zeros((2, MAX_LEN)), mask=jnp.ones((2, MAX_LEN))
    )
    lowered = step.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(__cudnn\$\w+)", lowered)
    assert sorted(calls) == sorted(cudnn_calls * LAYERS)  # forward and backward, each layer


def padded(real, pads, seed=2):
    """``real [B, R]`` ids placed at ``pads[b]`` in rows of MAX_LEN, the rest random
    ids; and the mask of the real tokens. ``pads[b]`` is an int (left padding,
    the rest right) or a list of positions to fill in order (gaps anywhere)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, VOCAB, (len(real), MAX_LEN))
    mask = np.zeros(toks.shape, bool)
    for b, where in enumerate(pads):
        where = range(where, where + real.shape[1]) if isinstance(where, int) else where
        toks[b, list(where)] = real[b]
        mask[b, list(where)] = True
    return jnp.asarray(toks, jnp.int32), mask


REAL = np.random.default_rng(5).integers(0, VOCAB, (4, 7))
PADS = [0, 2, 5, [0, 2, 3, 6, 7, 9, 11]]  # none, left and right, left only, gaps


def selected(values, mask):
    """The values (NumPy or JAX) at the real tokens of ``padded``, in order, as ``[B, R]``."""
    return values[mask].reshape(len(mask), -1)


@pytest.mark.parametrize(
    "path", ["blocks", "blocks of 5", "fused", "scan_layers, remat", "bf16", "bf16 fused"]
)
def test_masked_padding_gives_the_values_of_the_unpadded_sequence(monkeypatch, path):
    """Against the NumPy GPT-2 with the mask, and against the rows without their
    padding: left, right and gaps between real tokens, with random ids as padding."""
    monkeypatch.setattr(networks, "_QUERY_BLOCK", 5 if path == "blocks of 5" else 128)
    monkeypatch.setattr(networks, "_fused_attention", lambda: "fused" in path)
    jax.clear_caches()
    kwargs = dict(scan_layers=True, remat=True) if "scan" in path else {}
    model = tiny_transformer(dtype=jnp.bfloat16 if "bf16" in path else jnp.float32, **kwargs)
    randomise_head(model)
    toks, mask = padded(REAL, PADS)
    got = np.asarray(nnx.jit(lambda m, t, k: m(t, k))(model, toks, jnp.asarray(mask)))
    assert np.all(np.isfinite(got))
    tol = dict(rtol=0.05, atol=0.05) if "bf16" in path else dict(rtol=1e-4, atol=1e-4)
    params = numpy_params(model)
    if "scan" in path:
        params = layer_by_layer(params)
    np.testing.assert_allclose(got, numpy_transformer(params, toks, HEADS, mask), **tol)
    unpadded = np.asarray(run(model, jnp.asarray(REAL, jnp.int32)))
    np.testing.assert_allclose(selected(got, mask), unpadded, **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_padding_gives_the_gradient_of_the_unpadded_sequence(dtype):
    """A loss on the real tokens: padding reaches no parameter (the bf16 body's
    written-out attention gradient included)."""
    model = tiny_transformer(dtype=dtype)
    randomise_head(model)
    graphdef, params = nnx.split(model)
    toks, mask = padded(REAL, PADS)
    probe = jnp.asarray(np.random.default_rng(4).normal(size=REAL.shape), jnp.float32)

    def padded_loss(params):
        values = nnx.merge(graphdef, params)(toks, jnp.asarray(mask))
        return jnp.sum(jnp.sin(selected(values, mask)) * probe)

    def unpadded_loss(params):
        values = nnx.merge(graphdef, params)(jnp.asarray(REAL, jnp.int32))
        return jnp.sum(jnp.sin(values) * probe)

    got, want = (jax.jit(jax.grad(f))(params) for f in (padded_loss, unpadded_loss))
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            a, b, rtol=0, atol=(1e-5 if dtype == jnp.float32 else 0.02) * scale
        )


def test_pad_id_masks_its_tokens_through_the_update_step():
    """``pad_id`` is ``mask = tokens != pad_id`` on every call, so predict and the
    update step, which pass the tokens only, see the unpadded sequences."""
    pad = 3
    real = np.where(REAL == pad, pad + 1, REAL)
    toks, mask = padded(real, PADS)
    toks = jnp.where(jnp.asarray(mask), toks, pad)
    model = tiny_transformer(pad_id=pad)
    randomise_head(model)
    graphdef, params = nnx.split(model)
    got = np.asarray(valuefn.predict(graphdef, params, toks))
    np.testing.assert_allclose(got, np.asarray(run(model, toks)), rtol=0, atol=0)
    expected = numpy_transformer(numpy_params(model), toks, HEADS, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    unpadded = np.asarray(run(model, jnp.asarray(real, jnp.int32)))
    np.testing.assert_allclose(selected(got, mask), unpadded, rtol=1e-4, atol=1e-4)
    # One SGD step on the padded batch is the step on the rows without padding.
    targets = np.random.default_rng(6).normal(size=REAL.shape).astype(np.float32)
    padded_targets = np.zeros(toks.shape, np.float32)
    padded_targets[mask] = targets.ravel()
    steps = []
    for inputs, y, weights in [
        (toks, padded_targets, mask),
        (jnp.asarray(real, jnp.int32), targets, np.ones(REAL.shape, bool)),
    ]:
        graphdef, state = valuefn.init_train_state(model, optax.sgd(0.1))
        update_step = valuefn.make_update_step(graphdef, optax.sgd(0.1))
        batch = valuefn.Batch(inputs, jnp.asarray(y), jnp.asarray(weights, jnp.float32))
        steps.append(update_step(state, batch))
    (padded_state, padded_metrics), (state, metrics) = steps
    for name in ("value_loss", "grad_norm"):
        assert float(padded_metrics[name]) == pytest.approx(float(metrics[name]), rel=1e-5)
    for a, b in zip(*map(jax.tree.leaves, (padded_state.params, state.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # An explicit mask takes the place of pad_id's.
    everything = np.asarray(nnx.jit(lambda m, t: m(t, jnp.ones(t.shape, bool)))(model, toks))
    np.testing.assert_allclose(
        everything, numpy_transformer(numpy_params(model), toks, HEADS), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("features_in, features_out", [(3, 7), (7, 3)])
def test_dense_weight_gradient_equals_autodiff(features_in, features_out):
    """Both layouts of the CPU weight gradient (x^T g and (g^T x)^T) against jax.grad."""
    rng = np.random.default_rng(features_in)
    x = jnp.asarray(rng.normal(size=(2, 5, features_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(features_in, features_out)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(features_out,)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 5, features_out)), jnp.float32)

    def loss(affine, x, w, b):
        return jnp.sum(jnp.sin(affine(x, w, b)) * probe)

    def plain(x, w, b):
        return x @ w + b

    custom = jax.jit(jax.grad(lambda *a: loss(networks._affine, *a), argnums=(0, 1, 2)))(x, w, b)
    expected = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(custom, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(networks._affine(x, w, b), plain(x, w, b), rtol=1e-6)


@pytest.mark.parametrize("rows, columns", [(8192, 3), (12, 5), (7, 4), (1, 6), (130, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_is_the_transpose(rows, columns, dtype):
    """The CPU weight gradient's transpose into a row-major array, under jit."""
    x = np.random.default_rng(rows).normal(size=(rows, columns)).astype(np.float32)
    got = jax.jit(networks._transposed)(jnp.asarray(x, dtype))
    assert got.shape == (columns, rows) and got.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(jnp.asarray(x, dtype).T, np.float32)
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_affine_gradients_equal_autodiff(dtype):
    """x @ w + b: the custom VJP (canonical weight gradient, float32 bias sum) against jax.grad."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 5, 4)), dtype)
    w = jnp.asarray(rng.normal(size=(4, 6)), dtype)
    b = jnp.asarray(rng.normal(size=(6,)), dtype)
    probe = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)

    def loss(affine, x, w, b):
        return jnp.sum(jnp.sin(affine(x, w, b).astype(jnp.float32)) * probe)

    def plain(x, w, b):
        return (jnp.matmul(x, w, preferred_element_type=jnp.float32) + b).astype(dtype)

    custom = jax.jit(jax.grad(lambda *a: loss(networks._affine, *a), argnums=(0, 1, 2)))(x, w, b)
    expected = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(x, w, b)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for a, e in zip(custom, expected, strict=True):
        assert a.dtype == e.dtype == dtype
        e = np.asarray(e, np.float32)
        np.testing.assert_allclose(
            np.asarray(a, np.float32), e, rtol=tol, atol=tol * np.max(np.abs(e))
        )


def test_dense_layer_equals_nnx_linear():
    """Same parameters as nnx.Linear, same values and gradients; bf16 body, float32 parameters."""
    rngs = nnx.Rngs(0)
    dense = networks._Dense(4, 6, dtype=jnp.bfloat16, rngs=rngs)
    dense.bias[...] = jnp.arange(6, dtype=jnp.float32) / 7
    linear = nnx.Linear(4, 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(linear, nnx.state(dense))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)

    def loss(model):
        return jnp.sum(jnp.cos(model(x).astype(jnp.float32)))

    np.testing.assert_allclose(
        np.asarray(dense(x), np.float32), np.asarray(linear(x), np.float32), rtol=1e-2
    )
    grads = [nnx.grad(loss)(m) for m in (dense, linear)]
    for a, e in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        assert a.dtype == e.dtype == jnp.float32
        np.testing.assert_allclose(a, e, rtol=3e-2, atol=3e-2 * np.max(np.abs(e)))


def test_transformer_is_causal():
    model = tiny_transformer()
    randomise_head(model)
    toks = tokens(batch=1)
    changed = toks.at[0, 5].set((toks[0, 5] + 1) % VOCAB)
    before, after = np.asarray(run(model, toks)), np.asarray(run(model, changed))
    np.testing.assert_array_equal(before[0, :5], after[0, :5])
    assert np.all(np.abs(before[0, 5:] - after[0, 5:]) > 0)


def test_shorter_sequences_use_the_first_positions():
    model = tiny_transformer()
    randomise_head(model)
    toks = tokens()
    np.testing.assert_allclose(
        np.asarray(run(model, toks[:, :7])),
        np.asarray(run(model, toks))[:, :7],
        rtol=1e-5,
        atol=1e-6,
    )


def test_zero_init_heads_predict_zero():
    features = jnp.ones((2, 5, 3))
    mlp = valuefn.MLPValue(3, (16, 16), rngs=nnx.Rngs(0))
    backbone = nnx.Linear(3, 8, rngs=nnx.Rngs(0))
    head = valuefn.ValueHead(backbone, 8, rngs=nnx.Rngs(0))
    for model, inputs in [(mlp, features), (head, features), (tiny_transformer(), tokens())]:
        values = run(model, inputs)
        assert values.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(values), 0.0)
        np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), 0.0)
        np.testing.assert_array_equal(np.asarray(model.head.bias[...]), 0.0)
    assert mlp(features).shape == (2, 5)
    assert mlp(features[0, 0]).shape == ()


def test_mlp_matches_numpy():
    model = valuefn.MLPValue(3, (8, 4), rngs=nnx.Rngs(0))
    randomise_head(model)
    x = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
    p = numpy_params(model)
    h = x.astype(np.float64)
    for i in sorted(p["layers"]):
        h = np.tanh(numpy_linear(h, p["layers"][i]))
    expected = numpy_linear(h, p["head"])[..., 0]
    np.testing.assert_allclose(
        np.asarray(run(model, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6
    )


def test_value_head_on_own_backbone_matches_numpy():
    backbone = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), jax.nn.relu)
    model = valuefn.ValueHead(backbone, 8, rngs=nnx.Rngs(0))
    randomise_head(model)
    x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    p = numpy_params(model)
    h = np.maximum(numpy_linear(x, p["backbone"]["layers"][0]), 0)
    expected = numpy_linear(h, p["head"])[..., 0]
    np.testing.assert_allclose(
        np.asarray(run(model, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6
    )


def test_bf16_body_computes_in_bf16_with_float32_head():
    model = tiny_transformer(dtype=jnp.bfloat16)
    randomise_head(model)
    toks = tokens()
    values = run(model, toks)
    assert values.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(values)))
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    jaxpr = str(jax.make_jaxpr(model)(toks))
    assert "bf16" in jaxpr
    block_out = Block(D_MODEL, HEADS, num_layers=LAYERS, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(
        jnp.ones((1, 4, D_MODEL), jnp.bfloat16)
    )
    assert block_out.dtype == jnp.bfloat16
    f32 = tiny_transformer()
    randomise_head(f32)
    np.testing.assert_allclose(np.asarray(values), np.asarray(run(f32, toks)), rtol=0.05, atol=0.05)


def test_remat_gives_the_same_values_and_gradients():
    toks = tokens()
    results = []
    for remat in (False, True):
        model = tiny_transformer(remat=remat)
        randomise_head(model)
        graphdef, params = nnx.split(model)

        def loss(params, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params)(toks) ** 2)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (loss_plain, grads_plain), (loss_remat, grads_remat) = results
    np.testing.assert_allclose(loss_plain, loss_remat, rtol=1e-6)
    # Recomputed activations may be fused and rounded differently: an entry that
    # cancels to near 0 beside entries of 1e4 differs by float32 rounding of those.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.max(np.abs(b))),
        grads_plain,
        grads_remat,
    )


def layer_by_layer(params, num_layers=LAYERS):
    """``params`` of a ``scan_layers`` model as an unrolled model's: the blocks'
    stacked arrays split into one entry per layer."""
    blocks = params["blocks"]
    per_layer = {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)}
    return {**params, "blocks": per_layer}


def test_scanned_layers_match_numpy_gpt2_forward():
    model = tiny_transformer(scan_layers=True)
    randomise_head(model)
    toks = tokens()
    expected = numpy_transformer(layer_by_layer(numpy_params(model)), toks, HEADS)
    np.testing.assert_allclose(np.asarray(run(model, toks)), expected, rtol=1e-4, atol=1e-4)


def test_scanned_layers_initialise_each_layer_as_the_unrolled_model_does():
    scanned = numpy_params(tiny_transformer(scan_layers=True, seed=3))["blocks"]
    unrolled = numpy_params(tiny_transformer(seed=3))["blocks"]
    for path in (("attn", "out", "kernel"), ("proj", "kernel"), ("fc", "kernel")):
        stacked = functools.reduce(lambda tree, key: tree[key], path, scanned)
        first = functools.reduce(lambda tree, key: tree[key], path, unrolled[0])
        assert stacked.shape == (LAYERS, *first.shape)
        assert not np.allclose(stacked[0], stacked[1])  # each layer drawn on its own
        # The same distribution: N(0, 0.02), scaled by 1/sqrt(2 L) into the residual stream.
        np.testing.assert_allclose(stacked.std(), first.std(), rtol=0.25)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_give_the_unrolled_values_and_gradients(remat):
    toks = tokens()
    unrolled = tiny_transformer(remat=remat)
    randomise_head(unrolled)
    scanned = tiny_transformer(remat=remat, scan_layers=True, seed=7)
    params = nnx.to_pure_dict(nnx.state(unrolled))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params["blocks"].values())
    scanned_state = nnx.state(scanned)
    nnx.replace_by_pure_dict(scanned_state, {**params, "blocks": stacked})
    nnx.update(scanned, scanned_state)
    results = []
    for model in (unrolled, scanned):
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(toks) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(state)
        results.append((value, nnx.to_pure_dict(grads)))
    (value_unrolled, grads_unrolled), (value_scanned, grads_scanned) = results
    np.testing.assert_allclose(value_scanned, value_unrolled, rtol=1e-5)
    assert grads_scanned.keys() == grads_unrolled.keys()
    # Float rounding differs with the order XLA sums in: tolerances scale with each array.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
        layer_by_layer(grads_scanned),
        grads_unrolled,
    )


def test_remat_inside_the_layer_scan_lowers_the_gradients_peak_memory():
    # Structural: the scan's backward loop keeps only each block's input and
    # recomputes the block, where without remat it keeps every activation of
    # every block. (Unrolled, XLA's CPU scheduler may move the recomputation back
    # to where the activations were, so there remat need not save anything.)
    length = 128
    toks = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def peak(**kwargs):
        model = valuefn.TransformerValue(
            VOCAB, d_model=16, num_layers=4, num_heads=2, max_len=length, rngs=nnx.Rngs(0), **kwargs
        )
        graphdef, state = nnx.split(model)

        def loss(state, toks):
            return jnp.sum(nnx.merge(graphdef, state)(toks) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(state, toks).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scanned_remat = peak(scan_layers=True, remat=True)
    assert scanned_remat < 0.6 * peak(scan_layers=True)
    assert scanned_remat < 0.6 * peak()


def test_bad_arguments_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="num_heads"):
        valuefn.TransformerValue(
            10, d_model=30, num_layers=1, num_heads=4, max_len=8, rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="max_len"):
        tiny_transformer()(jnp.zeros((1, MAX_LEN + 1), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        tiny_transformer()(jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="x must have shape"):
        valuefn.MLPValue(3, (4,), rngs=nnx.Rngs(0))(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="floating dtype"):
        valuefn.MLPValue(3, (4,), rngs=nnx.Rngs(0))(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="hidden_sizes"):
        valuefn.MLPValue(3, (4, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_sizes"):
        valuefn.MLPValue(3, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model"):
        valuefn.TransformerValue(
            10, d_model=16.0, num_layers=1, num_heads=2, max_len=8, rngs=nnx.Rngs(0)
        )
    for bad_id in (-1, VOCAB):
        tokens = jnp.ones((2, 4), jnp.int32).at[1, 3].set(bad_id)
        with pytest.raises(ValueError, match=rf"tokens must lie in \[0, vocab_size={VOCAB}\)"):
            tiny_transformer()(tokens)
    for bad_pad in (-1, VOCAB, 1.0, True):
        with pytest.raises(ValueError, match="pad_id"):
            tiny_transformer(pad_id=bad_pad)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 5\), expected \(2, 4\)"):
        tiny_transformer()(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="mask must be bool or integer"):
        tiny_transformer()(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4)))
    head = valuefn.ValueHead(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_size"):
        head(jnp.ones((2, 3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_mode_through_a_critic_inside_plain_autodiff(dtype):
    # Forward mode (a directional derivative in parameter space) equals the
    # reverse-mode gradient's inner product with the direction; outside
    # plain_autodiff the CPU's custom_vjp layers have no forward mode.
    model = tiny_transformer(dtype=dtype)
    randomise_head(model)
    graphdef, params = nnx.split(model)
    toks = tokens(batch=2)

    def total(params):
        return jnp.sum(nnx.merge(graphdef, params)(toks))

    rng = np.random.default_rng(3)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    gradient = jax.jit(jax.grad(total))(params)
    expected = sum(
        float(jnp.vdot(g, d))
        for g, d in zip(jax.tree.leaves(gradient), jax.tree.leaves(direction), strict=True)
    )

    def forward(params, direction):
        return jax.jvp(total, (params,), (direction,))

    # Compiled (op-by-op dispatch is slow); plain_autodiff acts while tracing.
    with valuefn.plain_autodiff():
        value, tangent = jax.jit(forward)(params, direction)
    narrow = dtype == jnp.bfloat16
    np.testing.assert_allclose(value, jax.jit(total)(params), rtol=1e-2 if narrow else 1e-6)
    np.testing.assert_allclose(tangent, expected, rtol=3e-2 if narrow else 1e-4)
    if jax.default_backend() == "cpu":
        with pytest.raises(TypeError, match="custom_vjp"):
            forward(params, direction)
