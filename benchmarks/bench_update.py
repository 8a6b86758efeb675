"""Tokens per second of the critic's update step: valuefn (JAX) against PyTorch eager.

Run from the repository root::

    python -m benchmarks.bench_update [--quick] [--repeats N] [--default-xla-flags] [--markdown]

The model is the reference :class:`valuefn.TransformerValue` (vocab 1024,
d_model 256, 4 layers, 4 heads, 3,487,489 parameters) on batches of 32
sequences of 256 tokens; the step is ``clip_by_global_norm(1.0)`` + AdamW on
the PPO clipped value loss. The PyTorch side is the same model (parameter count
checked) and the same step in eager mode, with ``scaled_dot_product_attention``
and autocast for bf16, run when torch is installed. Rows:

- one update step, float32 and bf16 bodies;
- ``E x M`` epochs x minibatches of 32 x 256 tokens inside ONE jitted
  :func:`valuefn.make_epochs_step` call (1, 4, 16 updates), against the same
  loop over shuffled minibatches in PyTorch.

JAX and PyTorch calls are interleaved (one of each per round) so that both see
the same machine load, and the table reports medians and the speed ratio
``torch median / jax median`` (above 1: JAX is faster).

XLA flags: unless ``--default-xla-flags`` is given, the run sets
``--xla_cpu_experimental_xnn_fusion_type=dot`` (XNNPACK for the matmuls) and
``--xla_cpu_experimental_ynn_fusion_type=reduce`` (YNNPACK for reductions), which
measured faster on CPU than the defaults; the flags in effect are printed.
"""

from __future__ import annotations

import argparse
import os
import sys

TUNED_XLA_FLAGS = (
    "--xla_cpu_experimental_xnn_fusion_type=dot --xla_cpu_experimental_ynn_fusion_type=reduce"
)
# XLA reads its flags when the backend starts, so they are set before jax is imported.
if __name__ == "__main__" and "--default-xla-flags" not in sys.argv:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TUNED_XLA_FLAGS}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import valuefn  # noqa: E402
from benchmarks.timing import format_table, measure_many  # noqa: E402

REFERENCE = dict(vocab=1024, d_model=256, num_layers=4, num_heads=4, rows=32, seq_len=256)
QUICK = dict(vocab=64, d_model=32, num_layers=1, num_heads=2, rows=8, seq_len=16)
EPOCHS_X_MINIBATCHES = ((1, 1), (2, 2), (4, 4))
CLIP_EPSILON, LEARNING_RATE, MAX_GRAD_NORM = 0.2, 3e-4, 1.0


def make_data(config: dict, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (rows, config["seq_len"])
    targets = rng.normal(size=shape).astype(np.float32)
    return {
        "tokens": rng.integers(0, config["vocab"], shape).astype(np.int32),
        "targets": targets,
        "mask": np.ones(shape, np.float32),
        "old_values": (targets + 0.1 * rng.normal(size=shape)).astype(np.float32),
    }


def optimizer() -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(MAX_GRAD_NORM), optax.adamw(LEARNING_RATE, weight_decay=0.01)
    )


def jax_runner(config: dict, dtype, data: dict, epochs_x_minibatches=None):
    """``run()`` doing one update call on ``data`` and threading the state through."""
    model = valuefn.TransformerValue(
        config["vocab"],
        d_model=config["d_model"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        max_len=config["seq_len"],
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    graphdef, state = valuefn.init_train_state(model, optimizer())
    batch = jax.device_put(
        valuefn.Batch(data["tokens"], data["targets"], data["mask"], data["old_values"])
    )
    carry = {"state": state, "key": jax.random.key(0)}
    if epochs_x_minibatches is None:
        step = valuefn.make_update_step(graphdef, optimizer(), clip_epsilon=CLIP_EPSILON)

        def run():
            carry["state"], metrics = step(carry["state"], batch)
            return carry["state"], metrics

        return run
    num_epochs, num_minibatches = epochs_x_minibatches
    epochs_step = valuefn.make_epochs_step(
        graphdef,
        optimizer(),
        num_epochs=num_epochs,
        num_minibatches=num_minibatches,
        clip_epsilon=CLIP_EPSILON,
    )

    def run():
        carry["key"], key = jax.random.split(carry["key"])
        carry["state"], metrics = epochs_step(carry["state"], batch, key)
        return carry["state"], metrics

    return run


def torch_runner(torch, config: dict, bf16: bool, data: dict, epochs_x_minibatches=(1, 1)):
    """The same model and step in PyTorch eager; ``run()`` does the same updates as JAX's call."""
    model = torch_model(torch, config)
    params = sum(p.numel() for p in model.parameters())
    expected = valuefn.count_parameters(
        nnx.eval_shape(
            lambda: valuefn.TransformerValue(
                config["vocab"],
                d_model=config["d_model"],
                num_layers=config["num_layers"],
                num_heads=config["num_heads"],
                max_len=config["seq_len"],
                rngs=nnx.Rngs(0),
            )
        )
    )
    if params != expected:
        raise RuntimeError(f"the PyTorch model has {params} parameters, valuefn's {expected}")
    adamw = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    tokens = torch.from_numpy(data["tokens"].astype(np.int64))
    targets, mask, old = (torch.from_numpy(data[k]) for k in ("targets", "mask", "old_values"))
    num_epochs, num_minibatches = epochs_x_minibatches
    rows = tokens.shape[0] // num_minibatches

    def update(rows_index):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            values = model(tokens[rows_index])
        values = values.float()
        y, m, v_old = targets[rows_index], mask[rows_index], old[rows_index]
        clipped = v_old + (values - v_old).clamp(-CLIP_EPSILON, CLIP_EPSILON)
        losses = 0.5 * torch.maximum((values - y) ** 2, (clipped - y) ** 2)
        loss = (losses * m).sum() / m.sum()
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        adamw.step()
        return loss

    def run():
        for _ in range(num_epochs):
            order = torch.randperm(tokens.shape[0])
            for i in range(num_minibatches):
                loss = update(order[i * rows : (i + 1) * rows])
        return loss.item()

    return run


def torch_model(torch, config: dict):
    """GPT-2-style critic in PyTorch, layer for layer the valuefn.TransformerValue."""
    nn, functional = torch.nn, torch.nn.functional
    d_model, num_heads = config["d_model"], config["num_heads"]

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
            self.token_embed = nn.Embedding(config["vocab"], d_model)
            self.position_embed = nn.Embedding(config["seq_len"], d_model)
            self.blocks = nn.ModuleList([Block() for _ in range(config["num_layers"])])
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


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_update", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model: checks that it runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per row (default 5)")
    parser.add_argument(
        "--default-xla-flags", action="store_true", help="do not set the tuned XLA CPU flags"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else REFERENCE
    try:
        import torch
    except ImportError:
        torch = None

    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if torch is not None:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average before: {load_average()}")

    tokens = config["rows"] * config["seq_len"]
    rows = []
    cases = [("update step float32", jnp.float32, None), ("update step bf16", jnp.bfloat16, None)]
    cases += [
        (f"epochs {e}x{m} float32 ({e * m} updates)", jnp.float32, (e, m))
        for e, m in EPOCHS_X_MINIBATCHES
    ]
    for name, dtype, exm in cases:
        updates = 1 if exm is None else exm[0] * exm[1]
        data = make_data(config, config["rows"] * (1 if exm is None else exm[1]))
        fns = {"jax": jax_runner(config, dtype, data, exm)}
        if torch is not None:
            bf16 = dtype == jnp.bfloat16
            fns["torch"] = torch_runner(torch, config, bf16, data, exm or (1, 1))
        repeats = max(1, args.repeats // updates) if updates > 4 else args.repeats
        timings = measure_many(fns, repeats=max(repeats, 3), warmup=1)
        work = tokens * updates
        jax_t = timings["jax"]
        row = [
            f"{name}, {config['rows']}x{config['seq_len']} tokens per update",
            f"{jax_t.median:.3f}",
            f"{work / jax_t.median:,.0f}",
        ]
        if torch is not None:
            torch_t = timings["torch"]
            row += [
                f"{torch_t.median:.3f}",
                f"{work / torch_t.median:,.0f}",
                f"{torch_t.median / jax_t.median:.2f}",
            ]
        rows.append(row)
        print(f"  {row[0]}: " + ", ".join(row[1:]), flush=True)

    headers = ["case", "jax s", "jax tokens/s"]
    if torch is not None:
        headers += ["torch s", "torch tokens/s", "ratio (torch s / jax s)"]
    print(f"load average after: {load_average()}")
    print(format_table(headers, rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
