"""The ``valuefn`` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from valuefn import _host


class UsageError(Exception):
    """A bad flag or config file: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _read_config(args: argparse.Namespace, base=None):
    """The job's config: ``base`` (the defaults if None), then the config file, then flags."""
    import tomllib

    from valuefn.job import TrainConfig, config_from_dict

    config = TrainConfig() if base is None else base
    if args.config is not None:
        try:
            values = tomllib.loads(Path(args.config).read_text())
        except OSError as err:
            raise UsageError(f"cannot read config file {args.config}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"config file {args.config} is not valid TOML: {err}") from err
        try:
            config = config_from_dict(values, config)
        except ValueError as err:
            raise UsageError(f"{args.config}: {err}") from err
    flags = {name: getattr(args, name) for name in ("iterations", "seed", "gamma", "lam")}
    try:
        return config_from_dict({k: v for k, v in flags.items() if v is not None}, config)
    except ValueError as err:
        raise UsageError(f"flags: {err}") from err


def _resumed_config(args: argparse.Namespace, out: Path):
    """The config of the run in ``out``, as saved; only ``iterations`` may change."""
    import dataclasses
    import json

    from valuefn import checkpoint
    from valuefn.job import config_from_dict

    step = checkpoint.latest_step(out / "checkpoint")
    if step is None:
        raise UsageError(f"--resume: no checkpoint in {out} (pass the --out of the run)")
    try:
        saved = config_from_dict(json.loads((out / "config.json").read_text()))
    except (OSError, ValueError) as err:
        raise UsageError(
            f"--resume: cannot read the run's settings, {out}/config.json: {err}"
        ) from err
    config = _read_config(args, base=saved)
    asked = _flat(dataclasses.asdict(config))
    changed = [
        f"{name} ({value!r} in the run, {asked[name]!r} asked)"
        for name, value in _flat(dataclasses.asdict(saved)).items()
        if name != "iterations" and asked[name] != value
    ]
    if changed:
        raise UsageError(
            f"--resume continues a run with its own settings (only --iterations may change), "
            f"but {out}/config.json differs in {', '.join(changed)}"
        )
    if config.iterations <= step:
        raise UsageError(
            f"--resume: the run in {out} has trained {step} iterations already; "
            f"pass --iterations above {step} to train on"
        )
    return dataclasses.replace(saved, iterations=config.iterations)


def _flat(values: dict, prefix: str = "") -> dict:
    """``{"critic": {"d_model": 64}}`` -> ``{"critic.d_model": 64}``."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def _train(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if args.fsdp < 1:
        raise UsageError(f"--fsdp must be >= 1, got {args.fsdp}")
    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and any(flag is not None for flag in cluster):
        raise UsageError(
            "--coordinator-address, --num-processes and --process-id need --distributed"
        )

    import jax

    from valuefn import distributed, job, report

    if args.distributed:
        # Before anything that starts a JAX backend: reading the checkpoints does.
        try:
            distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        except ValueError as err:
            raise UsageError(f"--distributed: {err}") from err
    if args.resume:
        config = _resumed_config(args, out)
    else:
        config = _read_config(args)
        try:
            job.check_out(out)
        except ValueError as err:
            raise UsageError(f"--out: {err}") from err
    mesh = None
    if args.distributed or args.fsdp > 1 or jax.device_count() > 1:
        try:
            mesh = distributed.make_mesh(fsdp=args.fsdp)
        except ValueError as err:
            raise UsageError(f"--fsdp: {err}") from err
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: {err.strerror}") from err
    print(
        f"valuefn train: {config.iterations} iterations of {config.batch_size} dialogues "
        f"on {jax.device_count()} {jax.default_backend()} device(s); writing to {out}"
    )
    metrics = job.run(config, out, resume=args.resume, mesh=mesh, show_progress=not args.quiet)
    if jax.process_index() == 0 and metrics:
        report.print_summary(metrics, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``valuefn`` command's parser, with its ``train`` and ``bench`` subcommands."""
    parser = _Parser(prog="valuefn", description="Value functions for RL and RLHF in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train", help="train a critic on the built-in multi-turn dialogue task"
    )
    train.add_argument("--iterations", type=int, help="training iterations")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--gamma", type=float, help="per-token discount")
    train.add_argument("--lam", type=float, help="GAE lambda")
    train.add_argument("--out", help="output directory (default runs/<timestamp>)")
    train.add_argument("--config", help="TOML file with TrainConfig fields ([critic], [task])")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    scale = train.add_argument_group("scaling out (see README, 'Scaling out')")
    scale.add_argument("--fsdp", type=int, default=1, help="size of the mesh's fsdp axis")
    scale.add_argument(
        "--distributed", action="store_true", help="start jax.distributed (several hosts)"
    )
    scale.add_argument("--coordinator-address", help="host:port of process 0")
    scale.add_argument("--num-processes", type=int, help="processes in the job")
    scale.add_argument("--process-id", type=int, help="this process's index")
    train.set_defaults(run=_train)

    from valuefn.bench import suite

    bench = commands.add_parser(
        "bench", help="run the benchmark suite: print one table, write the results as JSON"
    )
    suite.add_arguments(bench)
    bench.set_defaults(run=suite.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``valuefn`` with ``argv`` (default ``sys.argv[1:]``); 2 is a usage error."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as err:
        print(f"valuefn: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """The installed ``valuefn`` command: :func:`main` with huge pages for XLA's buffers.

    ``train`` and ``bench`` start again with glibc's huge-page tunable set where
    that helps (see :mod:`valuefn._host`; ``VALUEFN_HUGE_PAGES=0`` turns it off),
    which costs them a second start-up of about a second.
    """
    if sys.argv[1:2] in (["train"], ["bench"]):
        _host.rerun_with_huge_pages("valuefn.cli")
    sys.exit(main())


if __name__ == "__main__":
    entry()
