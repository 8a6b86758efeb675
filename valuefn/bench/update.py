"""Tokens per second of the critic's update step: valuefn (JAX) against PyTorch eager.

The model is the reference :class:`valuefn.TransformerValue` (vocab 1024,
d_model 256, 4 layers, 4 heads, 3,487,489 parameters) on batches of 32
sequences of 256 tokens; the step is ``clip_by_global_norm(1.0)`` + AdamW on
the PPO clipped value loss. The PyTorch side is the same model (parameter count
checked) and the same step in eager mode, with ``scaled_dot_product_attention``
and autocast for bf16, run when torch is installed, with its default threads
and ``OMP_WAIT_POLICY=PASSIVE`` (set by the suite: spinning OpenMP threads made
it twice as slow on a shared 2-core machine). Figures:

- one update step, float32 and bf16 bodies;
- ``E x M`` epochs x minibatches of 32 x 256 tokens inside ONE jitted
  :func:`valuefn.make_epochs_step` call (1, 4, 16 updates), against the same
  loop over shuffled minibatches in PyTorch;
- one bf16 step of a GPT-2-small-shaped critic (d_model 768, 12 layers, 12
  heads, vocab 50257: 124M parameters at 1024 positions), JAX only, held
  against the datasheet bf16 peak on a known GPU or TPU (model FLOP utilisation) or
  the measured bf16 matmul rate elsewhere; and the same step with its blocks
  run by one scan (``TransformerValue(scan_layers=True)``), against the
  unrolled one.

JAX and PyTorch calls are interleaved (one of each per round) so that both see
the same machine load, and each timed call comes straight after an untimed
call of the same function, as steps do in a training loop (see
:func:`valuefn.bench.figures.measure_many` for why that matters on a virtual
machine); each JAX figure's baseline is the PyTorch one (ratio above 1: JAX is
faster), and its floor is the model FLOPs over the matmul rate
of its dtype. The suite runs with XLA's YNNPACK matmuls on a CPU (see
:data:`valuefn.bench.suite.TUNED_XLA_FLAGS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

import valuefn
from valuefn.bench import problem
from valuefn.bench.figures import Figure, Skipped, baseline_torch, measure_many, timed

ROWS, SEQ_LEN = 32, 256
QUICK_ROWS, QUICK_SEQ_LEN = 8, 16
EPOCHS_X_MINIBATCHES = ((1, 1), (2, 2), (4, 4))
QUICK_EPOCHS_X_MINIBATCHES = ((2, 2),)
# The GPT-2-small-shaped critic in bf16 (problem.GPT2_SMALL), JAX only: rows x
# length per step on an accelerator, and a token-sized batch on a CPU, where
# one step of 16 x 1024 tokens would take minutes.
LARGE_ROWS_X_LEN = {"cpu": (1, 256), "accelerator": (16, 1024)}


def jax_runner(spec: problem.ModelSpec, batch: valuefn.Batch, epochs_x_minibatches=None):
    """``run()`` doing one update call on ``batch`` and threading the state through.

    The call is compiled here, ahead of time, so that ``run()`` needs no warm-up.
    """
    graphdef, state = valuefn.init_train_state(
        problem.make_model(spec, batch.targets.shape[1]), problem.make_optimizer()
    )
    batch = jax.device_put(batch)
    carry = {"state": state, "key": jax.random.key(0)}
    if epochs_x_minibatches is None:
        step = problem.make_update_step(graphdef, problem.make_optimizer())
        step = step.lower(state, batch).compile()

        def run():
            carry["state"], metrics = step(carry["state"], batch)
            return carry["state"], metrics

        return run
    num_epochs, num_minibatches = epochs_x_minibatches
    epochs_step = valuefn.make_epochs_step(
        graphdef,
        problem.make_optimizer(),
        num_epochs=num_epochs,
        num_minibatches=num_minibatches,
        clip_epsilon=problem.CLIP_EPSILON,
    )
    epochs_step = epochs_step.lower(state, batch, carry["key"]).compile()

    def run():
        carry["key"], key = jax.random.split(carry["key"])
        carry["state"], metrics = epochs_step(carry["state"], batch, key)
        return carry["state"], metrics

    return run


def torch_runner(torch, spec: problem.ModelSpec, batch: valuefn.Batch, epochs_x_minibatches):
    """The same model and step in PyTorch eager; ``run()`` does the same updates as JAX's call."""
    seq_len = batch.targets.shape[1]
    model = torch_model(torch, spec, seq_len)
    params = sum(p.numel() for p in model.parameters())
    expected = valuefn.count_parameters(nnx.eval_shape(lambda: problem.make_model(spec, seq_len)))
    if params != expected:
        raise RuntimeError(f"the PyTorch model has {params} parameters, valuefn's {expected}")
    adamw = torch.optim.AdamW(
        model.parameters(), lr=problem.LEARNING_RATE, weight_decay=problem.WEIGHT_DECAY
    )
    tokens = torch.from_numpy(batch.inputs.astype(np.int64))
    targets, mask, old = (torch.from_numpy(x) for x in batch[1:])
    bf16 = spec.dtype == "bfloat16"
    num_epochs, num_minibatches = epochs_x_minibatches
    rows = tokens.shape[0] // num_minibatches
    epsilon = problem.CLIP_EPSILON

    def update(rows_index):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            values = model(tokens[rows_index])
        values = values.float()
        y, m, v_old = targets[rows_index], mask[rows_index], old[rows_index]
        clipped = v_old + (values - v_old).clamp(-epsilon, epsilon)
        losses = 0.5 * torch.maximum((values - y) ** 2, (clipped - y) ** 2)
        loss = (losses * m).sum() / m.sum()
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), problem.MAX_GRAD_NORM)
        adamw.step()
        return loss

    def run():
        for _ in range(num_epochs):
            order = torch.randperm(tokens.shape[0])
            for i in range(num_minibatches):
                loss = update(order[i * rows : (i + 1) * rows])
        return loss.item()

    return run


def torch_model(torch, spec: problem.ModelSpec, seq_len: int):
    """GPT-2-style critic in PyTorch, layer for layer the valuefn.TransformerValue."""
    nn, functional = torch.nn, torch.nn.functional
    d_model, num_heads = spec.d_model, spec.num_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_attn, self.ln_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.fc, self.proj = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

        def forward(self, x):
            batch, length, _ = x.shape
            qkv = self.qkv(self.ln_attn(x)).view(batch, length, 3, num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(attended.transpose(1, 2).reshape(batch, length, d_model))
            hidden = functional.gelu(self.fc(self.ln_mlp(x)), approximate="tanh")
            return x + self.proj(hidden)

    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embed = nn.Embedding(spec.vocab, d_model)
            self.position_embed = nn.Embedding(seq_len, d_model)
            self.blocks = nn.ModuleList([Block() for _ in range(spec.num_layers)])
            self.ln_final = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, 1)

        def forward(self, tokens):
            positions = torch.arange(tokens.shape[1])
            x = self.token_embed(tokens) + self.position_embed(positions)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_final(x).float()).squeeze(-1)

    torch.manual_seed(0)
    return Critic()


def run(quick: bool) -> Iterator[list[Figure] | Skipped]:
    """The update step against PyTorch eager, and the 124M critic (``quick``: tiny
    sizes), yielded case by case so that a run cut short keeps what it measured."""
    torch, left_out = baseline_torch("torch eager")
    yield from left_out
    base = problem.TINY if quick else problem.REFERENCE
    rows, seq_len = (QUICK_ROWS, QUICK_SEQ_LEN) if quick else (ROWS, SEQ_LEN)
    cases = [("update step", "float32", None), ("update step", "bfloat16", None)]
    for e, m in QUICK_EPOCHS_X_MINIBATCHES if quick else EPOCHS_X_MINIBATCHES:
        cases.append((f"epochs {e}x{m}", "float32", (e, m)))
    for name, dtype, exm in cases:
        spec = dataclasses.replace(base, dtype=dtype)
        updates = 1 if exm is None else exm[0] * exm[1]
        batch = problem.make_batch(rows * (1 if exm is None else exm[1]), seq_len, spec.vocab)
        fns = {"jax": jax_runner(spec, batch, exm)}
        if torch is not None:
            fns["torch"] = torch_runner(torch, spec, batch, exm or (1, 1))
        # Every timed call right after an untimed one, as in a training loop (see
        # measure_many). Single steps take 7 rounds, as the other kernels do, so
        # that their medians and the rounds won hold; a call of many updates
        # already averages over them: one round, so that the suite stays within
        # minutes.
        repeats = 7 if updates == 1 else 1
        timings = measure_many(fns, repeats=repeats, warmup=0, back_to_back=True)
        label = f"{name} {dtype} ({updates} x {rows}x{seq_len} tokens, {spec.describe()})"
        work = problem.step_work(spec, rows, seq_len, updates)
        figures, against = [], None
        if torch is not None:
            figures.append(timed(f"torch eager {label}", timings["torch"], **work))
            against = (f"torch eager {label}", timings["torch"])
        figures.append(timed(f"valuefn {label}", timings["jax"], against=against, **work))
        yield figures
    if quick:
        tiny = dataclasses.replace(base, dtype="bfloat16", num_layers=2)
        yield large_model_step(tiny, (1, 16))
    else:
        yield large_model_step()


def large_model_step(spec: problem.ModelSpec = problem.GPT2_SMALL, rows_x_len=None) -> list[Figure]:
    """One bf16 update step of the 124M-parameter critic, against the bf16 floor
    (MFU); and the same with its blocks run by one scan (``scan_layers``), against
    the unrolled step, timed in turn with it.

    ``spec`` and ``rows_x_len`` replace the model and the batch shape (a quick
    run uses a tiny model); by default the batch is ``LARGE_ROWS_X_LEN`` of the
    backend.
    """
    backend = "cpu" if jax.default_backend() == "cpu" else "accelerator"
    rows, seq_len = rows_x_len or LARGE_ROWS_X_LEN[backend]
    batch = problem.make_batch(rows, seq_len, spec.vocab)
    specs = {"unrolled": spec, "scan": dataclasses.replace(spec, scan_layers=True)}
    timings = measure_many(
        {name: jax_runner(each, batch) for name, each in specs.items()},
        repeats=3,
        warmup=0,
        back_to_back=True,
    )
    count = valuefn.count_parameters(nnx.eval_shape(lambda: problem.make_model(spec, seq_len)))
    names = {
        name: f"valuefn update step ({rows}x{seq_len} tokens, {each.describe()}, "
        f"{count:,} parameters)"
        for name, each in specs.items()
    }
    work = problem.step_work(spec, rows, seq_len)
    return [
        timed(names["unrolled"], timings["unrolled"], **work),
        timed(
            names["scan"],
            timings["scan"],
            against=(names["unrolled"], timings["unrolled"]),
            **work,
        ),
    ]
