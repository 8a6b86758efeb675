"""The ``valuefn`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import valuefn

    key_r, key_v = jax.random.split(jax.random.key(args.seed))
    rewards = jax.random.normal(key_r, (4, 16))
    values = jax.random.normal(key_v, (4, 16))
    terminated = np.zeros((4, 16), bool)
    terminated[:, 7] = True
    discounts = valuefn.discounts(0.99, terminated)
    advantages, returns = valuefn.gae(rewards, values, discounts, values[:, -1], 0.95)
    loss = valuefn.value_loss(values, returns)
    np.set_printoptions(precision=3, suppress=True, linewidth=120)
    print(f"backend: {jax.default_backend()}")
    print("GAE advantages, first row:\n", np.asarray(advantages[0]))
    print("lambda-returns, first row:\n", np.asarray(returns[0]))
    print(f"value loss 0.5*(V - G)^2 averaged over tokens: {float(loss):.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valuefn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compute GAE targets and a value loss on random data")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
