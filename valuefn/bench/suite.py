"""Runs the benchmark suite: one table on stdout, one JSON file of results.

``valuefn bench`` (or ``python -m benchmarks`` in the repository) runs every
benchmark module's ``run(quick)``, measures the machine's limits first, and
writes ``<out>/<backend>-<date>.json`` with the machine, the versions, the
commit of a valuefn checkout (``source``: None for an installed copy), and for
every figure its median, min, max, its baseline (with the baseline's median,
and its min, max and the rounds the figure won where the two were timed in
the same rounds) and its fraction of the
hardware limit. The file is written after each benchmark too (and after each
section of those that yield their figures in sections: the target kernels
shape by shape, the update steps case by case), with ``"complete": false``
until the last, so that a run cut short by a job's time limit keeps what it
measured; ``--budget SECONDS`` starts nothing new once that time is spent,
and lists what it left out under ``skipped``. Until the run ends the file is named
``...-partial.json``, so that an earlier finished run's file is not replaced
by a run cut short. ``--only`` names its benchmarks in the file's name, and
``--quick`` runs everything at tiny sizes, to check that it runs; its file is
named ``...-quick.json``. ``--show FILE`` prints
a saved run's table and ``--compare BEFORE AFTER`` two saved runs' figures side
by side (:func:`compare_results`), without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from valuefn import _host

# The update step runs first, and the Pallas sweeps last: on a GPU those are
# experimental compilations that could take the process down, and neither the
# 124M critic's MFU nor the target kernels' figures may depend on them.
BENCHMARKS = (
    "hardware",
    "update",
    "targets",
    "footprint",
    "rollout",
    "iteration",
    "scaling",
    "sweeps",
)
VERSIONED = ("valuefn", "jax", "jaxlib", "flax", "optax", "numpy", "torch", "rlax")
SCHEMA = 1
# XLA CPU flags the suite runs with unless --default-xla-flags: YNNPACK for the
# matmuls (its native bf16 GEMM; XNNPACK takes the dots YNNPACK leaves) and for
# the reductions, measured faster than the defaults for the update step
# (benchmarks/RESULTS.md). They touch the CPU backend only.
TUNED_XLA_FLAGS = (
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's command-line flags, shared by ``valuefn bench`` and ``python -m benchmarks``."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that every benchmark runs"
    )
    parser.add_argument(
        "--only",
        type=_benchmark_list,
        default=list(BENCHMARKS),
        help=f"comma-separated benchmarks to run, of {', '.join(BENCHMARKS)} "
        "(hardware always runs: it gives the floors)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results", help="results folder (default benchmarks/results)"
    )
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument(
        "--budget",
        type=_seconds,
        metavar="SECONDS",
        help="start no benchmark, or section of one, after this many seconds; "
        "what is left out is listed as skipped",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--default-xla-flags",
        action="store_true",
        help=f"run without the tuned XLA CPU flags ({' '.join(TUNED_XLA_FLAGS)})",
    )
    saved = parser.add_mutually_exclusive_group()
    saved.add_argument(
        "--show",
        metavar="RESULTS",
        type=read_results,
        help="print the table of a saved results file; runs nothing",
    )
    saved.add_argument(
        "--compare",
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        type=read_results,
        help="print the figures two saved results files both hold, side by side; runs nothing",
    )


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(
            f"--budget must be a positive number of seconds, got {text!r}"
        )
    return seconds


def _benchmark_list(text: str) -> list[str]:
    """``"targets,update"`` -> ``["hardware", "targets", "update"]``, in the suite's order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(BENCHMARKS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}"
        )
    return ["hardware", *(name for name in BENCHMARKS if name in names and name != "hardware")]


# The vector instruction sets that set XLA's and PyTorch's CPU matmul and bf16
# speed, as /proc/cpuinfo names them (x86 "flags", Arm "Features"): a VM may
# report only "AMD EPYC" as its model name, for a Zen 3 without AVX-512 and a
# Zen 4 with AVX-512 BF16 alike.
CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


def cpu_description(cpuinfo: str) -> dict:
    """The first processor of ``/proc/cpuinfo``'s text: its ``processor`` (model
    name, or None), ``cpu_model`` (``"family F model M"``, or None) and
    ``cpu_features``, those of :data:`CPU_FEATURES` it has, in that order."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block has ended
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    family, model = fields.get("cpu family"), fields.get("model")
    return {
        "processor": fields.get("model name"),
        "cpu_model": f"family {family} model {model}" if family and model else None,
        "cpu_features": [name for name in CPU_FEATURES if name in flags],
    }


def _machine() -> dict:
    import jax

    devices = jax.devices()
    try:
        cpu = cpu_description(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = cpu_description("")
    processor = cpu.pop("processor") or platform.processor()
    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "platform": platform.platform(),
        "processor": processor,
        **cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "transparent_huge_pages": _host.transparent_huge_pages(),
    }


def source_revision(package: Path | None = None) -> dict | None:
    """The git commit of the valuefn checkout that runs, and whether its tracked
    files differ from it; None where valuefn is not imported from a checkout
    (an installed copy, or a tree without its history).

    ``package`` is valuefn's package folder; it counts as a checkout's only where
    it is ``valuefn/`` at the top of a git work tree that has a ``pyproject.toml``,
    so that an installed copy inside another project's repository is not taken
    for one.
    """
    if package is None:
        package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() / "valuefn" != package.resolve():
        return None
    if not (Path(top) / "pyproject.toml").is_file():
        return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit, "modified": bool(status)}


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy a shared machine was."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def _versions() -> dict:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _figure_record(benchmark: str, figure, rates: dict[str, float]) -> dict:
    from valuefn.bench.hardware import floor_fraction

    record = {
        "benchmark": benchmark,
        "name": figure.name,
        "unit": figure.unit,
        "median": figure.median,
        "min": figure.min,
        "max": figure.max,
        "baseline": None,
        "ratio": figure.ratio,
        "work": figure.work,
        "work_unit": figure.work_unit,
        "rate": figure.rate,
        "floor": None,
    }
    if figure.baseline is not None:
        record["baseline"] = {"name": figure.baseline, "median": figure.baseline_median}
        if figure.baseline_min is not None:
            record["baseline"].update(min=figure.baseline_min, max=figure.baseline_max)
        if figure.rounds is not None:
            record["baseline"].update(wins=figure.wins, rounds=figure.rounds)
    if figure.floor is not None:
        record["floor"] = {
            "limit": figure.floor,
            "work": figure.floor_work,
            "limit_rate": rates.get(figure.floor),
            "fraction": floor_fraction(figure, rates),
        }
    return record


def _run_one(
    name: str, quick: bool, errors: dict, skipped: dict, echo, on_section=None, deadline=None
) -> list:
    """The figures of benchmark ``name``; failures go to ``errors``, what was
    not run to ``skipped``.

    A benchmark's ``run(quick)`` returns its figures, or yields them section by
    section (lists of figures), with a :class:`~valuefn.bench.figures.Skipped`
    for each part it leaves out. After each section ``on_section(figures so
    far)`` is called, so the results file keeps them; a failure in a later
    section keeps the earlier ones; and past ``deadline`` (a
    ``time.monotonic()`` value) no further section is started.
    """
    from valuefn.bench.figures import Skipped

    module_name = f"valuefn.bench.{name}"
    if importlib.util.find_spec(module_name) is None:
        skipped[name] = f"no module {module_name}"
        echo(f"[{name}] skipped: {skipped[name]}")
        return []
    if deadline is not None and time.monotonic() > deadline:
        skipped[name] = "not started: the time budget was spent"
        echo(f"[{name}] skipped: {skipped[name]}")
        return []
    echo(f"[{name}] running ...", flush=True)
    began = time.perf_counter()
    figures = []
    try:
        produced = importlib.import_module(module_name).run(quick)
        sections = iter([produced] if isinstance(produced, list) else produced)
        while True:
            if deadline is not None and time.monotonic() > deadline:
                skipped[name] = f"cut short after {len(figures)} figures: the time budget was spent"
                echo(f"[{name}] {skipped[name]}")
                break
            section = next(sections, None)
            if section is None:
                break
            if isinstance(section, Skipped):
                skipped[f"{name}: {section.what}" if section.what else name] = section.reason
                continue
            figures += section
            if on_section is not None:
                on_section(figures)
    except Exception as err:  # one broken benchmark must not lose the others' figures
        errors[name] = "".join(traceback.format_exception_only(type(err), err)).strip()
        echo(f"[{name}] failed: {errors[name]}; {len(figures)} figures kept")
        echo(traceback.format_exc(), file=sys.stderr)
        return figures
    echo(f"[{name}] {len(figures)} figures in {time.perf_counter() - began:.1f} s")
    return figures


def run_suite(
    names: list[str], *, quick: bool, echo=print, progress=None, budget: float | None = None
) -> dict:
    """Runs the benchmarks ``names`` (``"hardware"`` first) and returns the results record.

    The hardware is measured again after the others, and each of its figures
    keeps the better of its two runs: on a shared machine the load changes, and
    the limit is the best the machine did. A benchmark that fails is reported
    under ``errors`` and the others still run; one whose module is not
    installed is listed under ``skipped``. After each benchmark but the last,
    and after each section of a benchmark that yields its figures in sections,
    ``progress`` (if given) gets the record so far, with ``"complete": False``:
    a run cut short by a job's time limit keeps what it measured. With a
    ``budget`` in seconds, no benchmark or section starts after it is spent;
    what was left out is listed under ``skipped``.
    """
    from valuefn.bench.hardware import limits

    started = time.time()
    load_before = _load_average()
    source = source_revision()
    errors, skipped = {}, {}

    def record(produced: list, complete: bool, running: str | None = None) -> dict:
        """The record of the benchmarks ``produced`` so far; ``running`` names one
        whose figures are those of its sections so far."""
        rates = limits(produced[0][1]) if produced[0][0] == "hardware" else {}
        return {
            "schema": SCHEMA,
            "date": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(
                timespec="seconds"
            ),
            "quick": quick,
            "complete": complete,
            "benchmarks": names,
            "ran": [name for name, _ in produced if name != running],
            "running": running,
            "machine": {
                **_machine(),
                "load_average": {"start": load_before, "end": _load_average()},
            },
            "versions": _versions(),
            "source": source,
            "limits": rates,
            "figures": [
                _figure_record(name, figure, rates)
                for name, figures in produced
                for figure in figures
            ],
            "errors": errors,
            "skipped": skipped,
            "seconds": time.time() - started,
        }

    deadline = None if budget is None else time.monotonic() + budget
    produced = []
    for name in names:

        def on_section(figures, name=name):
            if progress is not None:
                progress(record([*produced, (name, list(figures))], False, running=name))

        produced.append((name, _run_one(name, quick, errors, skipped, echo, on_section, deadline)))
        if progress is not None and len(produced) < len(names):
            progress(record(produced, complete=False))
    if produced[0][0] == "hardware" and produced[0][1]:
        again = _run_one("hardware", quick, errors, {}, echo, None, deadline)
        best = {figure.name: figure for figure in produced[0][1]}
        for figure in again:
            if figure.name in best and figure.min < best[figure.name].min:
                best[figure.name] = figure
        produced[0] = ("hardware", list(best.values()))
    return record(produced, complete=True)


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _quantity(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"


def _versus(figure: dict) -> str:
    """The ratio to the baseline, with the rounds won where they were paired: ``1.1x (5/7)``."""
    if figure["ratio"] is None:
        return ""
    text = f"{figure['ratio']:.3g}x"
    rounds = figure["baseline"].get("rounds")
    return text if rounds is None else f"{text} ({figure['baseline']['wins']}/{rounds})"


def format_results(results: dict, *, markdown: bool = False) -> str:
    """The results as one plain-text (or Markdown) table under a line naming the machine."""
    from valuefn.bench.figures import format_table

    rows = []
    for f in results["figures"]:
        of_limit = _of_limit(f)
        rows.append(
            [
                f["name"],
                _quantity(f["median"], f["unit"]),
                _quantity(f["min"], f["unit"]),
                _quantity(f["max"], f["unit"]),
                "" if f["rate"] is None else _si(f["rate"], f"{f['work_unit']}/s"),
                "" if f["baseline"] is None else f["baseline"]["name"],
                _versus(f),
                of_limit and f"{of_limit} {f['floor']['limit']}",
            ]
        )
    headers = [
        "figure",
        "median",
        "min",
        "max",
        "rate",
        "baseline",
        "vs baseline (rounds won)",
        "of limit",
    ]
    lines = [
        _run_line(results),
        *([""] if markdown else []),
        format_table(headers, rows, markdown=markdown),
    ]
    notes = settings_notes(results["figures"])
    notes += [f"skipped {name}: {why}" for name, why in results["skipped"].items()]
    notes += [f"FAILED {name}: {why}" for name, why in results["errors"].items()]
    return _with_notes(lines, notes, markdown)


def _of_limit(figure: dict) -> str:
    """The figure's fraction of its hardware limit, ``"61%"``, or ``""`` without one."""
    fraction = (figure["floor"] or {}).get("fraction")
    return "" if fraction is None else f"{100 * fraction:.3g}%"


def _with_notes(lines: list[str], notes: list[str], markdown: bool) -> str:
    """``lines`` and then ``notes`` under them, in Markdown as a list after a blank line."""
    if markdown and notes:
        notes = ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines + notes)


def settings_notes(figures: list[dict]) -> list[str]:
    """What a run says of the settings it maps: for each method of GAE's method
    map, the shortest horizon from which it beat ``scan`` at every batch size
    measured, there and at every longer horizon (what ``auto`` is set from), and
    the fastest configuration of each Pallas sweep against its defaults."""
    ratios: dict[str, dict[int, list[float]]] = {}
    for f in figures:
        mapped = re.fullmatch(r"gae map: (\w+) (\d+)x(\d+)", f["name"])
        if mapped and f["ratio"] is not None:
            method, horizon = mapped[1], int(mapped[3])
            ratios.setdefault(method, {}).setdefault(horizon, []).append(f["ratio"])
    notes = []
    for method, by_horizon in ratios.items():
        horizons = sorted(by_horizon)
        ahead = [
            t for i, t in enumerate(horizons) if all(min(by_horizon[u]) > 1 for u in horizons[i:])
        ]
        if ahead:
            says = f"ahead of scan at every batch size from T = {ahead[0]} up"
        else:
            says = f"behind or level with scan at some batch size even at T = {horizons[-1]}"
        notes.append(f"gae map: {method} {says} (measured at T = {horizons[0]} to {horizons[-1]})")
    for sweep in ("pallas recursion, ", "pallas gae with a mask, "):
        swept = [f for f in figures if f["name"].startswith(sweep) and f["ratio"] is not None]
        if swept:
            best = max(swept, key=lambda f: f["ratio"])
            notes.append(f"fastest {best['name']}: {best['ratio']:.3g}x its defaults")
    return notes


def _run_line(results: dict) -> str:
    """The machine, the versions and the date of a run, on one line."""
    machine, versions = results["machine"], results["versions"]
    tunables = machine.get("glibc_tunables")
    return (
        f"{machine['backend']}: {machine['device_count']} x {machine['device_kind']}, "
        f"{machine['processor']}"
        + (f" {machine['cpu_model']}" if machine.get("cpu_model") else "")
        + (f" ({' '.join(machine['cpu_features'])})" if machine.get("cpu_features") else "")
        + f", {machine['cpu_count']} CPUs"
        + (f" (GLIBC_TUNABLES={tunables})" if tunables else "")
        + f"; jax {versions['jax']}, "
        f"torch {versions['torch']}, rlax {versions['rlax']}; {results['date']}"
        + (" (quick)" if results["quick"] else "")
        + _source_words(results.get("source"))
        + _cut_short_words(results)
    )


def _cut_short_words(results: dict) -> str:
    if results.get("complete", True):
        return ""
    running = results.get("running")
    left = [
        name
        for name in results["benchmarks"]
        if name not in results.get("ran", []) and name != running
    ]
    return (
        "; cut short"
        + (f" in {running}" if running else "")
        + (f", not run: {', '.join(left)}" if left else "")
    )


def _source_words(source: dict | None) -> str:
    if source is None:
        return ""
    return f"; valuefn at {source['commit'][:7]}" + (" with changes" if source["modified"] else "")


def read_results(path: str) -> dict:
    """A results file that ``valuefn bench`` wrote, read and checked.

    Raises ``argparse.ArgumentTypeError`` (a ``ValueError``) naming the file when it
    cannot be read or is not a results file of this suite's schema.
    """
    try:
        results = json.loads(Path(path).read_text())
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {err}") from err
    if not isinstance(results, dict) or "figures" not in results:
        raise argparse.ArgumentTypeError(f"{path} is not a results file of valuefn bench")
    if results.get("schema") != SCHEMA:
        raise argparse.ArgumentTypeError(
            f"{path} has schema {results.get('schema')!r}; this valuefn reads schema {SCHEMA}"
        )
    missing = [
        f"{where}{key}"
        for where, record, keys in (
            ("", results, _RESULTS_KEYS),
            ("machine.", results.get("machine") or {}, _MACHINE_KEYS),
            ("versions.", results.get("versions") or {}, ("jax", "torch", "rlax")),
            *((f"figures[{i}].", f, _FIGURE_KEYS) for i, f in enumerate(results["figures"])),
        )
        for key in keys
        if not isinstance(record, dict) or key not in record
    ]
    if missing:
        raise argparse.ArgumentTypeError(f"{path} lacks {', '.join(missing[:5])}")
    return results


_RESULTS_KEYS = ("date", "quick", "machine", "versions", "skipped", "errors")
_MACHINE_KEYS = ("backend", "device_count", "device_kind", "processor", "cpu_count")
_FIGURE_KEYS = ("name", "unit", "median", "min", "max", "rate", "baseline", "ratio", "floor")


def compare_results(before: dict, after: dict, *, markdown: bool = False) -> str:
    """The figures that two runs both hold, matched by name, as one table.

    ``after vs before`` is before's median over after's, so above 1 the later run
    was faster (or, for memory, smaller). Where the machines or their loads
    differ, the ratios each run measured against its own baseline compare
    better than the medians, and both are shown.
    """
    from valuefn.bench.figures import format_table

    earlier = {f["name"]: f for f in before["figures"]}
    later = {f["name"]: f for f in after["figures"]}

    rows = [
        [
            name,
            _quantity(earlier[name]["median"], f["unit"]),
            _quantity(f["median"], f["unit"]),
            f"{earlier[name]['median'] / f['median']:.3g}x",
            _versus(earlier[name]),
            _versus(f),
            _of_limit(earlier[name]),
            _of_limit(f),
        ]
        for name, f in later.items()
        if name in earlier
    ]
    headers = [
        "figure",
        "before",
        "after",
        "after vs before",
        "vs baseline, before",
        "vs baseline, after",
        "of limit, before",
        "of limit, after",
    ]
    lines = [f"before: {_run_line(before)}", f"after: {_run_line(after)}"]
    if markdown:
        lines = [line + "  " for line in lines] + [""]
    lines.append(format_table(headers, rows, markdown=markdown))
    notes = [
        f"only {which} ({len(names)}): {', '.join(names)}"
        for which, names in (
            ("before", [name for name in earlier if name not in later]),
            ("after", [name for name in later if name not in earlier]),
        )
        if names
    ]
    return _with_notes(lines, notes, markdown)


def results_path(results: dict, out: Path) -> Path:
    """``out/<backend>-<date>[-<benchmarks>][-quick][-partial].json``."""
    parts = [results["machine"]["backend"], results["date"][:10]]
    if results["benchmarks"] != list(BENCHMARKS):
        parts.append("+".join(results["benchmarks"][1:]) or "hardware")
    if results["quick"]:
        parts.append("quick")
    if not results.get("complete", True):
        parts.append("partial")
    return out / ("-".join(parts) + ".json")


def _command_line(args: argparse.Namespace, prog: str) -> str:
    flags = [prog]
    if args.quick:
        flags.append("--quick")
    if args.only != list(BENCHMARKS):
        flags += ["--only", ",".join(args.only)]
    flags += ["--out", args.out]
    if args.budget is not None:
        flags += ["--budget", f"{args.budget:g}"]
    for flag in ("no_save", "markdown", "default_xla_flags"):
        if getattr(args, flag):
            flags.append("--" + flag.replace("_", "-"))
    return " ".join(flags)


def _xla_accepts(flags: list[str]) -> bool:
    """Whether this jaxlib's XLA knows ``flags``. XLA aborts a process whose
    ``XLA_FLAGS`` name a flag it does not know, and experimental CPU flags come
    and go between jaxlib releases, so a short-lived process starts JAX's CPU
    backend with them."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", "import jax; jax.devices()"]
    try:
        probe = subprocess.run(command, env=env, capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def add_xla_flags(candidates) -> None:
    """Adds those of ``candidates`` that this jaxlib knows to ``XLA_FLAGS``, beside
    the flags already set (a flag already named keeps its value). XLA reads them
    when JAX starts its backends, so this must run before anything does; the
    processes started afterwards inherit them."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {flag.split("=")[0] for flag in flags}
    wanted = [flag for flag in candidates if flag.split("=")[0] not in names]
    if wanted and not _xla_accepts(wanted):
        known = [flag for flag in wanted if _xla_accepts([flag])]
        for flag in wanted:
            if flag not in known:
                print(
                    f"this jaxlib's XLA does not know {flag}; running without it", file=sys.stderr
                )
        wanted = known
    os.environ["XLA_FLAGS"] = " ".join(flags + wanted)


def _use_tuned_xla_flags() -> None:
    """Adds :data:`TUNED_XLA_FLAGS` by :func:`add_xla_flags`; nothing has started
    JAX's backends yet when the suite starts from the command line."""
    add_xla_flags(TUNED_XLA_FLAGS)


def run_cli(args: argparse.Namespace, prog: str = "valuefn bench") -> int:
    """Runs the suite as the flags in ``args`` say; returns the exit code (1 if any failed)."""
    if args.show is not None:
        print(format_results(args.show, markdown=args.markdown))
        return 0
    if args.compare is not None:
        print(compare_results(*args.compare, markdown=args.markdown))
        return 0
    if not args.default_xla_flags:
        _use_tuned_xla_flags()
    # PyTorch's OpenMP threads spin at every barrier; where other work shares the
    # cores a descheduled thread stalls the rest, which halved the PyTorch update
    # step on the 2-core benchmark machine. Read when torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = _command_line(args, prog)

    def save(results: dict) -> Path:
        results["command"] = command
        path = results_path(results, Path(args.out))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed over: a run killed mid-write keeps the last file whole.
        written = path.with_name(path.name + ".tmp")
        written.write_text(json.dumps(results, indent=1) + "\n")
        written.replace(path)
        return path

    results = run_suite(
        args.only,
        quick=args.quick,
        progress=None if args.no_save else save,
        budget=args.budget,
    )
    print(format_results(results, markdown=args.markdown))
    if not args.no_save:
        print(f"wrote {save(results)}")
        results_path({**results, "complete": False}, Path(args.out)).unlink(missing_ok=True)
    return 1 if results["errors"] else 0


def main(argv: list[str] | None = None, *, prog: str = "python -m benchmarks") -> int:
    """Runs the suite, ``--show`` or ``--compare`` with ``argv``; returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv), prog)
