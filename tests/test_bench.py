"""The benchmark suite: ``valuefn bench --quick`` runs every benchmark and writes its JSON."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuefn import cli
from valuefn.bench import figures, hardware, problem, suite, targets
from valuefn.bench.figures import Figure, Timing, measure_many, timed
from valuefn.targets import _keeps_one_run


def test_quick_suite_writes_every_figure_with_its_baseline_and_floor(tmp_path):
    # Its own process: the scaling benchmark needs JAX to start afresh. It inherits
    # the tests' XLA flags (conftest.py), which cut the compiles that dominate it.
    command = [sys.executable, "-m", "valuefn.cli", "bench", "--quick", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert path.name == f"{results['machine']['backend']}-{results['date'][:10]}-quick.json"
    assert results["quick"] is True
    assert results["complete"] is True
    assert results["errors"] == {}
    assert results["command"].startswith("valuefn bench --quick")
    assert set(results["benchmarks"]) == set(suite.BENCHMARKS)
    assert {"backend", "device_kind", "device_count", "cpu_count"} <= set(results["machine"])
    assert set(suite.TUNED_XLA_FLAGS) <= set(results["machine"]["xla_flags"].split())
    assert results["versions"]["jax"] and results["versions"]["valuefn"]
    assert "source" in results  # the commit where valuefn runs from a checkout, else None
    measured = {hardware.MEMORY, *hardware.MATMUL.values()}
    assert measured <= set(results["limits"]) <= measured | {hardware.PEAK_BF16}
    assert all(rate > 0 for rate in results["limits"].values())

    ran = {f["benchmark"] for f in results["figures"]}
    assert ran == set(suite.BENCHMARKS) - set(results["skipped"])
    for figure in results["figures"]:
        assert figure["unit"] in ("s", "bytes")
        assert 0 < figure["min"] <= figure["median"] <= figure["max"]
        if figure["baseline"] is not None:
            assert figure["baseline"]["median"] > 0
            assert figure["ratio"] == pytest.approx(figure["baseline"]["median"] / figure["median"])
            if "rounds" in figure["baseline"]:  # timed: its spread is kept too
                baseline = figure["baseline"]
                assert 0 < baseline["min"] <= baseline["median"] <= baseline["max"]
        if figure["floor"] is not None:
            assert figure["floor"]["limit"] in results["limits"]
            assert figure["floor"]["fraction"] > 0
    large, scanned = [
        f for f in results["figures"] if f["name"].startswith("valuefn update step (")
    ]
    assert "bfloat16" in large["name"] and "scan layers" not in large["name"]
    assert large["floor"]["limit"] in (hardware.MATMUL["bfloat16"], hardware.PEAK_BF16)
    assert "scan layers" in scanned["name"] and scanned["baseline"]["name"] == large["name"]
    scanned_remat = [
        f["name"] for f in results["figures"] if f["name"].endswith("remat, scan layers")
    ]
    assert any("peak memory" in name for name in scanned_remat)
    deep = [f["name"] for f in results["figures"] if "L2" in f["name"] and "compile" in f["name"]]
    assert len(deep) == 2 and deep[1].endswith(", scan layers")
    gae = [f for f in results["figures"] if f["name"].startswith("gae auto ")]
    assert gae and all(f["baseline"] and f["floor"] for f in gae)
    # Compared in the same rounds: the rounds won are counted.
    assert all(0 <= f["baseline"]["wins"] <= f["baseline"]["rounds"] for f in gae)
    returns = [
        f for f in results["figures"] if f["name"].startswith(("td_", "n_step", "lambda_r", "disc"))
    ]
    assert len(returns) == 6 and all(f["floor"] for f in returns)
    stages = [f for f in results["figures"] if f["name"].startswith("iteration stage")]
    assert stages and all("wins" not in f["baseline"] for f in stages)
    rollouts = [f for f in results["figures"] if f["name"].startswith("rollout jit")]
    assert [f["baseline"]["name"] for f in rollouts] == [
        "rollout host loop 1x8",
        "rollout host loop 8x8",
    ]
    assert all(f["baseline"]["rounds"] == 3 for f in rollouts)
    assert "figure" in run.stdout and "vs baseline" in run.stdout


def test_unknown_benchmark_is_a_usage_error(capsys):
    assert cli.main(["bench", "--only", "targets,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_only_runs_hardware_first_then_in_suite_order():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--only", "scaling,targets"])
    assert args.only == ["hardware", "targets", "scaling"]


def test_tuned_xla_flags_keep_the_flags_already_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_xnn_fusion_type=none --other=1")
    suite._use_tuned_xla_flags()
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_cpu_experimental_xnn_fusion_type=none",
        "--other=1",
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce",
    ]


def test_tuned_xla_flags_leave_out_a_flag_this_xla_does_not_know(monkeypatch, capsys):
    # XLA aborts a process on an unknown flag; the suite must run without it.
    unknown = "--xla_cpu_no_such_flag_in_any_release=1"
    monkeypatch.setattr(suite, "TUNED_XLA_FLAGS", (unknown, *suite.TUNED_XLA_FLAGS))
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    suite._use_tuned_xla_flags()
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_backend_optimization_level=0",
        *suite.TUNED_XLA_FLAGS[1:],
    ]
    assert unknown in capsys.readouterr().err


def test_gae_without_torch_or_rlax_is_compared_with_the_numpy_loop():
    figures = targets.compare_shape(2, 16, repeats=1, torch=None, rlax=None)
    names = [f.name for f in figures]
    assert names[0] == "gae numpy loop 2x16"
    assert all(f.baseline == "numpy loop 2x16" for f in figures[1:])
    assert all(f.floor_work == targets.gae_bytes(2, 16) for f in figures[1:])


def test_results_so_far_are_handed_on_after_each_benchmark_but_the_last(monkeypatch):
    monkeypatch.setattr(suite, "_run_one", lambda name, *args: [Figure(name, 1.0, 1.0, 1.0)])
    seen = []
    final = suite.run_suite(["targets", "update", "rollout"], quick=True, progress=seen.append)
    assert [record["complete"] for record in seen] == [False, False]
    assert [[f["name"] for f in record["figures"]] for record in seen] == [
        ["targets"],
        ["targets", "update"],
    ]
    assert final["complete"] is True
    assert [f["name"] for f in final["figures"]] == ["targets", "update", "rollout"]


def _fake_benchmark(monkeypatch, run):
    """``valuefn.bench.fake``, a benchmark module whose ``run`` is ``run``."""
    import importlib.machinery

    module = types.ModuleType("valuefn.bench.fake")
    module.__spec__ = importlib.machinery.ModuleSpec("valuefn.bench.fake", None)
    module.run = run
    monkeypatch.setitem(sys.modules, "valuefn.bench.fake", module)


def test_a_benchmark_in_sections_keeps_each_section_and_what_it_left_out(monkeypatch):
    def sections(quick):
        yield [Figure("a", 1.0, 1.0, 1.0)]
        yield figures.Skipped("pallas", "no Triton here")
        yield [Figure("b", 1.0, 1.0, 1.0), Figure("c", 1.0, 1.0, 1.0)]
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    _fake_benchmark(monkeypatch, sections)
    seen = []
    results = suite.run_suite(
        ["fake", "fake"], quick=True, echo=lambda *a, **k: None, progress=seen.append
    )
    # Saved after each section, and between the benchmarks.
    assert [[f["name"] for f in record["figures"]] for record in seen] == [
        ["a"],
        ["a", "b", "c"],
        ["a", "b", "c"],
        ["a", "b", "c", "a"],
        ["a", "b", "c", "a", "b", "c"],
    ]
    assert [record["running"] for record in seen] == ["fake", "fake", None, "fake", "fake"]
    assert [record["ran"] for record in seen][:3] == [[], [], ["fake"]]
    assert suite._cut_short_words(seen[3]).startswith("; cut short in fake")
    assert [f["name"] for f in results["figures"]] == ["a", "b", "c"] * 2
    assert results["skipped"] == {"fake: pallas": "no Triton here"}
    assert "RESOURCE_EXHAUSTED" in results["errors"]["fake"]


def test_a_time_budget_starts_no_section_or_benchmark_once_spent(monkeypatch):
    def sections(quick):
        yield [Figure("a", 1.0, 1.0, 1.0)]
        yield [Figure("b", 1.0, 1.0, 1.0)]

    _fake_benchmark(monkeypatch, sections)
    clock = iter(range(0, 1000, 10))  # each look at the clock 10 s later
    monkeypatch.setattr(suite.time, "monotonic", lambda: next(clock))
    results = suite.run_suite(["fake", "fake"], quick=True, echo=lambda *a, **k: None, budget=25)
    # Deadline 25: the first benchmark starts at 10 and its first section at 20; at
    # 30 its second section is not started, nor at 40 the second benchmark.
    assert [f["name"] for f in results["figures"]] == ["a"]
    assert results["skipped"]["fake"].startswith("not started")
    assert results["errors"] == {}


@pytest.mark.parametrize("budget", [None, 25])
def test_hardware_is_measured_again_at_the_end_within_the_budget_keeping_the_best(
    monkeypatch, budget
):
    mins = iter([1.0, 0.5])

    def run(quick):
        best = next(mins)
        return [Figure(f"{hardware.MEMORY} (copy)", 2.0, best, 3.0, work=10.0, work_unit="B")]

    monkeypatch.setattr(hardware, "run", run)
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(suite.time, "monotonic", lambda: next(clock))
    results = suite.run_suite(["hardware"], quick=True, echo=lambda *a, **k: None, budget=budget)
    [figure] = results["figures"]
    # Without a budget the second, faster run counts; with one spent, there is none.
    assert figure["min"] == (0.5 if budget is None else 1.0)


def test_method_map_counts_the_bytes_of_gae_without_a_mask():
    [figure] = targets.method_map([(2, 16)], repeats=1, gae_methods=("scan", "associative"))
    assert figure.name == "gae map: associative 2x16"
    # rewards and values read, advantages and returns written, and the bootstrap value.
    assert figure.floor_work == 4 * (4 * 2 * 16 + 2)


@pytest.mark.parametrize("budget", ["0", "-5", "soon", "inf", "nan"])
def test_budget_must_be_a_positive_number_of_seconds(budget, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--budget", budget])
    assert "--budget must be a positive number of seconds" in capsys.readouterr().err


def test_targets_on_an_accelerator_say_what_they_leave_out(monkeypatch):
    monkeypatch.setattr(targets.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(targets, "_pallas_fails", lambda *args: "no Triton here")
    for module in (targets, figures):  # torch and rlax "installed"
        monkeypatch.setattr(module, "optional", lambda name: types.ModuleType(name))
    sections = targets.run(quick=True)
    assert [next(sections), next(sections)] == [
        figures.Skipped("torch loop", "it runs on the CPU, JAX on gpu"),
        figures.Skipped("pallas", "no Triton here"),
    ]


def test_sweeps_run_last_and_only_where_pallas_compiles(monkeypatch):
    from valuefn.bench import sweeps

    assert suite.BENCHMARKS[-1] == "sweeps"
    if jax.default_backend() != "gpu":
        results = suite.run_suite(["sweeps"], quick=True, echo=lambda *a, **k: None)
        assert list(results["skipped"]) == ["sweeps"] and results["figures"] == []
    monkeypatch.setattr(sweeps.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(sweeps, "_pallas_fails", lambda *args: None)

    def fake_sweep(batch, horizon, configs, *, repeats):
        yield figures.Skipped(f"setting {configs[0]}", "out of shared memory")
        yield [Figure(f"swept {configs[0]}", 1.0, 1.0, 1.0)]

    monkeypatch.setattr(sweeps, "fused_sweep", fake_sweep)
    monkeypatch.setattr(sweeps, "pallas_sweep", fake_sweep)
    results = suite.run_suite(["sweeps"], quick=True, echo=lambda *a, **k: None)
    fused, recursion = targets.FUSED_SWEEP[0], targets.PALLAS_SWEEP[0]
    assert [f["name"] for f in results["figures"]] == [f"swept {fused}", f"swept {recursion}"]
    assert results["skipped"] == {
        f"sweeps: setting {fused}": "out of shared memory",
        f"sweeps: setting {recursion}": "out of shared memory",
    }
    monkeypatch.setattr(sweeps, "_pallas_fails", lambda *args: "no Triton here")
    results = suite.run_suite(["sweeps"], quick=True, echo=lambda *a, **k: None)
    assert results["skipped"] == {"sweeps": "no Triton here"} and results["figures"] == []


def test_pallas_is_timed_only_where_its_kernels_are_compiled(monkeypatch):
    assert ("pallas" in targets.methods()) == (jax.default_backend() == "gpu")
    monkeypatch.setattr(targets.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(targets, "_pallas_fails", lambda *args: None)
    assert targets.methods()[-1] == "pallas"
    monkeypatch.setattr(targets, "_pallas_fails", lambda *args: "no Triton here")
    assert "pallas" not in targets.methods()


def test_pallas_figures_run_interpreted_at_tiny_sizes(capsys, monkeypatch):
    # On a CPU Pallas interprets the kernels: slow, but the figures' code runs.
    compared = targets.compare_shape(
        2, 16, repeats=1, torch=None, rlax=None, gae_methods=("scan", "pallas")
    )
    assert [f.name for f in compared] == [
        "gae numpy loop 2x16",
        "gae scan 2x16",
        "gae pallas 2x16",
        "gae auto, mask with gaps 2x16",
    ]
    mapped = targets.method_map([(2, 16)], repeats=1, gae_methods=("scan", "associative", "pallas"))
    assert [f.name for f in mapped] == ["gae map: associative 2x16", "gae map: pallas 2x16"]
    assert all(f.baseline == "gae map: scan 2x16" for f in mapped)
    # A configuration whose kernels fail (Mosaic GPU takes blocks of 128 columns
    # or more) is left out, not the sweep.
    configs = [("triton", 4, 8), ("mosaic_gpu", 4, 8)]
    ([swept], mosaic) = targets.pallas_sweep(2, 16, configs, repeats=1)
    assert swept.name == "pallas recursion, triton, chunks of 4 steps, blocks of 8 rows 2x16"
    assert mosaic.what == "pallas recursion, mosaic_gpu, chunks of 4 steps, blocks of 8 rows"
    assert "'backend': 'mosaic_gpu'" in capsys.readouterr().err
    assert swept.floor_work == 4 * 3 * 2 * 16
    # GAE's kernels that read the inputs, against defaults that fit 16 steps:
    # chunks that do not divide T are left out.
    monkeypatch.setattr(targets._pallas_gae, "CHUNK", 8)
    ([fused], too_long) = targets.fused_sweep(2, 16, [(4, 2), (32, 2)], repeats=1)
    assert fused.name == "pallas gae with a mask, chunks of 4 steps, blocks of 2 rows 2x16"
    assert isinstance(too_long, figures.Skipped)
    assert "'fused': True, 'chunk': 32" in capsys.readouterr().err
    assert fused.floor_work == targets.gae_bytes(2, 16)
    # The notes under the table find these figures by their names.
    records = [suite._figure_record("targets", f, {}) for f in (*mapped, swept, fused)]
    assert [" ".join(note.split()[:3]) for note in suite.settings_notes(records)] == [
        "gae map: associative",
        "gae map: pallas",
        "fastest pallas recursion,",
        "fastest pallas gae",
    ]


def test_pallas_sweeps_time_one_configuration_at_a_time(capsys):
    # Each configuration is its own section, compiled only when the one before
    # it has been timed: the suite saves each section as it comes, so a
    # compiler that takes the process down keeps the figures before it.
    ran = []

    def call(config):
        ran.append(config)
        if config == "b":
            raise RuntimeError("too many registers")
        return jnp.ones(3)

    calls = {c: functools.partial(call, c) for c in "abc"}
    sweep = functools.partial(
        targets._sweep,
        options=lambda c: {"setting": c},
        name=lambda c: f"setting {c}",
        shape=(2, 16),
        floor_work=1,
        repeats=1,
    )
    sections = sweep(calls, ["a", "b", "c"], "a")
    [first] = next(sections)
    assert first.name == "setting a 2x16" and "c" not in ran
    assert next(sections) == figures.Skipped("setting b", "RuntimeError: too many registers")
    [last] = next(sections)
    assert last.name == "setting c 2x16" and last.baseline == "defaults a 2x16"
    assert next(sections, None) is None
    err = capsys.readouterr().err
    assert err.index("compiling {'setting': 'b'}") < err.index("compiling {'setting': 'c'}")
    # Defaults that fail leave every configuration out, and nothing is timed.
    ran.clear()
    calls["a"] = functools.partial(call, "b")
    assert list(sweep(calls, ["a", "c"], "a")) == [
        figures.Skipped(f"setting {c}", "RuntimeError: too many registers") for c in "ac"
    ]
    assert ran == ["b"]


def test_gae_figures_take_the_right_padded_and_the_general_masked_paths():
    _, _, _, mask = targets.make_inputs(64, 256)
    lengths = mask.sum(axis=1)
    assert lengths.min() >= 128 and lengths.max() <= 256 and len(set(lengths)) > 1
    assert bool(_keeps_one_run(jnp.asarray(mask != 0)))
    assert bool(_keeps_one_run(jnp.asarray(mask[:, ::-1] != 0)))  # left-padded
    gaps = targets.with_gaps(mask)
    assert np.all(gaps <= mask) and 0.05 < 1 - gaps.sum() / mask.sum() < 0.15
    assert not bool(_keeps_one_run(jnp.asarray(gaps != 0)))


def test_gae_is_compared_with_rlax_output_for_output():
    def rlax_gae(rewards, discounts, lambda_, values, stop_target_gradients):
        return rewards + discounts * values[1:] - values[:-1]  # any function of rlax's inputs

    rlax = types.SimpleNamespace(truncated_generalized_advantage_estimation=rlax_gae)
    figures = {f.name: f for f in targets.compare_shape(2, 16, repeats=1, torch=None, rlax=rlax)}
    both = figures["gae auto, per-step discounts, no mask 2x16"]
    advantages = figures["gae auto advantages, per-step discounts, no mask 2x16"]
    assert both.baseline == "rlax + returns 2x16"
    assert both.floor_work == targets.gae_bytes(2, 16)
    assert advantages.baseline == "rlax 2x16"
    assert advantages.floor_work == targets.gae_bytes(2, 16, outputs=1)
    assert advantages.floor_work < both.floor_work


def _rlax_of_loops(shift=1):
    """rlax's multistep returns for one row, written as its docstrings state them:
    ``v_t`` is the value after step t. ``shift=0`` misreads it as the value at t."""

    def next_values(v):
        return v if shift else jnp.concatenate([v[:1], v[:-1]])

    def lambda_returns(r, d, v, lambda_=1.0, stop_target_gradients=False):
        v = next_values(jnp.broadcast_to(v, r.shape))
        returns, g = [], v[-1]
        for t in reversed(range(r.shape[0])):
            g = r[t] + d[t] * ((1 - lambda_) * v[t] + lambda_ * g)
            returns.insert(0, g)
        return jnp.stack(returns)

    def n_step_bootstrapped_returns(r, d, v, n, lambda_t=1.0, stop_target_gradients=False):
        v, horizon, returns = next_values(v), r.shape[0], []
        for t in range(horizon):
            g = v[min(t + n, horizon) - 1]
            for k in reversed(range(t, min(t + n, horizon))):
                g = r[k] + d[k] * g
            returns.append(g)
        return jnp.stack(returns)

    return types.SimpleNamespace(
        lambda_returns=lambda_returns,
        n_step_bootstrapped_returns=n_step_bootstrapped_returns,
        discounted_returns=functools.partial(lambda_returns, lambda_=1.0),
    )


def test_returns_are_compared_with_rlax_on_its_inputs_output_for_output():
    figures = targets.compare_returns(2, 16, repeats=1, rlax=_rlax_of_loops())
    *figures, masked, left = figures
    n_step = f"n_step_targets n={targets.RETURNS_N}, per-step discounts"
    assert masked.name == f"{n_step}, right-padded mask 2x16"
    assert masked.baseline == figures[1].name  # the same targets without the mask
    assert left.name == f"{n_step}, left-padded mask 2x16" and left.baseline == masked.name
    baselines = {f.name.rsplit(", per-step", 1)[0]: f.baseline for f in figures}
    assert baselines == {
        "td_targets": "rlax n-step n=1 2x16",
        f"n_step_targets n={targets.RETURNS_N}": f"rlax n-step n={targets.RETURNS_N} 2x16",
        "lambda_returns auto": "rlax lambda_returns 2x16",
        "discounted_returns auto": "rlax discounted_returns 2x16",
    }
    assert all(f.rounds == 1 and f.floor == hardware.MEMORY for f in figures)
    # Rewards, values and discounts read, the targets written; no values for the returns.
    assert [f.floor_work for f in figures] == [targets.gae_bytes(2, 16, outputs=1)] * 3 + [
        targets.gae_bytes(2, 16, per_step_inputs=2, outputs=1)
    ]
    # Inputs that do not line up with rlax's are caught before anything is timed.
    with pytest.raises(AssertionError, match="td_targets, rlax n-step n=1"):
        targets.compare_returns(2, 16, repeats=1, rlax=_rlax_of_loops(shift=0))


def test_returns_without_rlax_are_held_against_their_floor_alone():
    *figures, masked, left = targets.compare_returns(2, 16, repeats=1, rlax=None)
    assert len(figures) == 4
    assert all(f.baseline is None and f.floor_work > 0 for f in figures)
    assert masked.baseline == figures[1].name and masked.floor_work > 0
    assert left.baseline == masked.name and left.floor_work == masked.floor_work


def test_floor_fraction_is_the_floor_time_over_the_measured_time():
    rates = hardware.limits(
        [Figure(f"{hardware.MEMORY} (copy)", 2.0, 1.0, 3.0, work=10.0, work_unit="B")]
    )
    assert rates == {hardware.MEMORY: 10.0}  # the best repeat: 10 B in 1 s
    figure = Figure("kernel", 4.0, 4.0, 4.0, floor=hardware.MEMORY, floor_work=20.0)
    assert hardware.floor_fraction(figure, rates) == pytest.approx(0.5)  # 2 s of 4 s


def test_a_figures_rate_min_fraction_and_record_use_the_right_statistic():
    timing = Timing(median=2.0, min=1.0, max=4.0, repeats=5)
    figure = timed("kernel", timing, work=10.0, work_unit="B")
    assert (figure.median, figure.min, figure.max) == (2.0, 1.0, 4.0)
    assert figure.rate == pytest.approx(5.0)  # work over the median
    kernel = figure._replace(floor=hardware.MEMORY, floor_work=20.0)
    rates = hardware.limits(
        [
            Figure(f"{hardware.MEMORY} (copy)", 2.0, 1.0, 3.0, work=20.0, work_unit="B"),
            Figure(f"{hardware.MEMORY} (sum)", 2.0, 1.0, 3.0, work=10.0, work_unit="B"),
        ]
    )
    assert rates == {hardware.MEMORY: 20.0}  # the better of copy and sum
    record = suite._figure_record("targets", kernel, rates)
    assert record["rate"] == pytest.approx(5.0)
    assert record["floor"] == {
        "limit": hardware.MEMORY,
        "work": 20.0,
        "limit_rate": 20.0,
        "fraction": pytest.approx(0.5),  # 1 s at the limit, of the median 2 s
    }
    assert suite._of_limit(record) == "50%"


def test_hardware_figures_count_the_bytes_and_flops_they_move():
    works = {figure.name: figure.work for figure in hardware.run(quick=True)}
    assert works == {
        f"{hardware.MEMORY} (copy 4 MiB)": 2 * 4 * 2**20,  # read and written
        f"{hardware.MEMORY} (sum 4 MiB)": 4 * 2**20,
        f"{hardware.MATMUL['float32']} (256x256)": 2 * 256**3,
        f"{hardware.MATMUL['bfloat16']} (256x256)": 2 * 256**3,
    }


def test_update_step_work_is_tokens_and_training_flops_per_update():
    spec = problem.REFERENCE
    flops = hardware.transformer_flops(
        d_model=spec.d_model, num_layers=spec.num_layers, seq_len=256, tokens=32 * 256
    )
    assert problem.train_flops(spec, 32, 256) == flops
    work = problem.step_work(spec, 32, 256, updates=4)
    assert (work["work"], work["work_unit"]) == (4 * 32 * 256, "tokens")
    assert work["floor_work"] == 4 * flops


def test_gae_bytes_are_the_float32_arrays_read_and_written():
    # rewards, values and the mask or discounts read; advantages and returns written.
    assert targets.gae_bytes(2, 16) == 4 * (5 * 2 * 16 + 2)
    assert targets.gae_bytes(2, 16, per_step_inputs=2, outputs=1) == 4 * (3 * 2 * 16 + 2)


@pytest.mark.parametrize(
    ("device_kind", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v6 lite", 918),
        ("TPU v4 lite", None),
        ("cpu", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_datasheet_peak_is_the_chip_of_the_device_kind(device_kind, tflops):
    """MFU divides by this: a PCIe part must not get its SXM namesake's peak,
    nor an inference TPU its training namesake's."""
    peak = hardware.datasheet_bf16(device_kind)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_measure_many_times_every_function_each_round_in_a_new_order():
    calls = []
    timings = measure_many(
        {name: functools.partial(calls.append, name) for name in "abc"}, repeats=30, warmup=1
    )
    assert calls[:3] == list("abc")  # the warm-up
    rounds = ["".join(calls[i : i + 3]) for i in range(3, len(calls), 3)]
    assert all(sorted(r) == list("abc") for r in rounds)
    # No function always follows the same one, within rounds or across them.
    timed = "".join(rounds)
    assert {timed[i + 1] for i in range(len(timed) - 1) if timed[i] == "a"} == {"a", "b", "c"}
    assert all(isinstance(t, Timing) and t.repeats == 30 for t in timings.values())


def test_gae_comparisons_time_each_call_straight_after_an_untimed_one(monkeypatch):
    loop, calls = targets.numpy_gae, []
    monkeypatch.setattr(targets, "numpy_gae", lambda *args: calls.append(1) or loop(*args))
    targets.compare_shape(2, 16, repeats=3, torch=None, rlax=None)
    assert len(calls) == 1 + 2 * 3  # the warm-up, then an untimed and a timed call a round


def test_measure_many_back_to_back_calls_each_function_again_before_timing_it():
    calls = []
    timings = measure_many(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=5,
        warmup=0,
        back_to_back=True,
    )
    assert len(calls) == 20
    assert all(calls[i] == calls[i + 1] for i in range(0, 20, 2))
    assert all(t.repeats == 5 for t in timings.values())


def test_figures_count_the_rounds_won_against_a_baseline_timed_in_the_same_rounds(monkeypatch):
    # Each call returns the time it is to be given.
    monkeypatch.setattr(figures, "_wall_time", lambda fn: fn())
    scripted = {"a": [1.0, 5.0, 2.0, 6.0, 3.0], "b": [4.0, 4.0, 4.0, 4.0, 4.0], "c": [9.0] * 5}
    timings = measure_many(
        {name: functools.partial(list.pop, times, 0) for name, times in scripted.items()},
        repeats=5,
        warmup=0,
    )
    assert timings["a"].times == (1.0, 5.0, 2.0, 6.0, 3.0)
    figure = timed("a", timings["a"], against=("b", timings["b"]))
    assert (figure.wins, figure.rounds) == (3, 5)
    assert figure.ratio == pytest.approx(4.0 / 3.0)
    assert (figure.baseline_min, figure.baseline_max) == (4.0, 4.0)
    assert timed("b", timings["b"], against=("a", timings["a"])).baseline_max == 6.0
    assert timed("b", timings["b"], against=("c", timings["c"])).wins == 5
    # Not timed in the same rounds, or against itself: nothing to count.
    [other] = measure_many({"a": lambda: 1.0}, repeats=5, warmup=0).values()
    assert timed("a", other, against=("b", timings["b"])).rounds is None
    assert timed("a", timings["a"], against=("a", timings["a"])).rounds is None


def test_table_shows_the_rounds_won_next_to_the_ratio():
    record = suite._figure_record(
        "targets",
        Figure("x", 1.0, 1.0, 1.0, baseline="y", baseline_median=2.0, wins=6, rounds=7),
        {},
    )
    assert record["baseline"] == {"name": "y", "median": 2.0, "wins": 6, "rounds": 7}
    unpaired = suite._figure_record(
        "targets", Figure("z", 1.0, 1.0, 1.0, baseline="y", baseline_median=3.0), {}
    )
    results = {
        "figures": [record, unpaired],
        "machine": {
            "backend": "cpu",
            "device_count": 1,
            "device_kind": "cpu",
            "processor": "p",
            "cpu_count": 2,
        },
        "versions": {"jax": "0", "torch": None, "rlax": None},
        "date": "2026-11-25",
        "quick": False,
        "skipped": {},
        "errors": {},
    }
    table = suite.format_results(results)
    assert "2x (6/7)" in table
    assert "3x" in table and "3x (" not in table


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 vaes

processor\t: 1
cpu family\t: 99
model name\t: another
flags\t\t: amx_tile amx_bf16
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sve sve2 bf16 i8mm
CPU implementer\t: 0x41

processor\t: 1
model name\t: another processor's
"""


def test_machine_records_the_first_processors_model_and_vector_features():
    assert suite.cpu_description(ZEN4) == {
        "processor": "AMD EPYC",
        "cpu_model": "family 25 model 17",
        "cpu_features": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"],
    }
    assert suite.cpu_description(GRAVITON) == {
        "processor": None,
        "cpu_model": None,
        "cpu_features": ["asimd", "sve", "sve2", "bf16", "i8mm"],
    }
    assert suite.cpu_description("") == {"processor": None, "cpu_model": None, "cpu_features": []}
    machine = {
        "backend": "cpu",
        "device_count": 1,
        "device_kind": "cpu",
        "processor": "AMD EPYC",
        "cpu_count": 2,
    }
    results = {
        "figures": [],
        "machine": {**machine, **suite.cpu_description(ZEN4), "processor": "AMD EPYC"},
        "versions": {"jax": "0", "torch": None, "rlax": None},
        "date": "2026-11-26",
        "quick": False,
        "skipped": {},
        "errors": {},
    }
    line = "AMD EPYC family 25 model 17 (avx2 fma avx512f avx512_vnni avx512_bf16), 2 CPUs"
    assert line in suite.format_results(results)
    # Files written before the features were recorded still print.
    assert "AMD EPYC, 2 CPUs" in suite.format_results({**results, "machine": machine})


def _saved_run(monkeypatch, path, *, gae: tuple, memory_mib: float, other: str) -> str:
    """A results file as ``valuefn bench`` writes it: a figure ``gae`` with its
    ``(median, baseline median, rounds won of 7)``, a footprint and a figure ``other``."""
    median, baseline_median, wins = gae
    produced = {
        "hardware": [],
        "targets": [
            Figure(
                "gae",
                median,
                median / 2,
                median * 2,
                baseline="loop",
                baseline_median=baseline_median,
                wins=wins,
                rounds=7,
            ),
            Figure(other, 1.0, 1.0, 1.0),
        ],
        "footprint": [Figure("memory", *[memory_mib * 2**20] * 3, unit="bytes")],
    }
    monkeypatch.setattr(suite, "_run_one", lambda name, *args: produced[name])
    results = suite.run_suite(list(produced), quick=False, echo=lambda *a, **k: None)
    path.write_text(json.dumps(results))
    return str(path)


def test_compare_puts_the_figures_both_runs_hold_side_by_side(monkeypatch, tmp_path, capsys):
    before = _saved_run(
        monkeypatch, tmp_path / "before.json", gae=(4.0, 8.0, 5), memory_mib=3, other="gone"
    )
    after = _saved_run(
        monkeypatch, tmp_path / "after.json", gae=(2.0, 10.0, 7), memory_mib=1, other="new"
    )
    assert cli.main(["bench", "--compare", before, after]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1] in "gm"}
    # before / after medians, after's speed-up over before, each run's own ratio to its baseline.
    assert rows["gae"][1:] == ["4", "s", "2", "s", "2x", "2x", "(5/7)", "5x", "(7/7)"]
    assert rows["memory"][1:6] == ["3.0", "MiB", "1.0", "MiB", "3x"]
    assert "only before (1): gone" in out and "only after (1): new" in out
    assert out.startswith("before: cpu") and "\nafter: cpu" in out

    assert cli.main(["bench", "--show", after, "--markdown"]) == 0
    shown = capsys.readouterr().out
    assert "| gae | 2 s | 1 s | 4 s |" in shown and "5x (7/7)" in shown


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("{not json", "is not JSON"),
        (b"\x7fELF\xff\xfe", "is not JSON"),
        ('{"machine": {}}', "is not a results file"),
        ('{"figures": [], "schema": 0}', "has schema 0"),
        ('{"figures": [{"name": "x"}], "schema": 1}', "lacks date, quick, machine"),
    ],
)
def test_compare_and_show_name_a_file_they_cannot_read(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert cli.main(["bench", "--show", str(path)]) == 2
    error = capsys.readouterr().err
    assert "--show" in error and str(path) in error and message in error
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--compare", str(path), str(path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_cut_short_keeps_an_earlier_finished_file_and_says_it_was_cut(
    monkeypatch, tmp_path, capsys
):
    def figures(name, *args):
        return [] if name == "hardware" else [Figure(name, 1.0, 1.0, 1.0)]

    def cut_at_rollout(name, *args):
        if name == "rollout":
            raise KeyboardInterrupt  # as a job's time limit would stop it
        return figures(name)

    argv = ["bench", "--only", "targets,rollout", "--out", str(tmp_path), "--default-xla-flags"]
    monkeypatch.setattr(suite, "_run_one", figures)
    assert cli.main(argv) == 0
    [finished] = tmp_path.glob("*.json")
    written = finished.read_text()

    monkeypatch.setattr(suite, "_run_one", cut_at_rollout)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert finished.read_text() == written
    partial = finished.with_name(finished.stem + "-partial.json")
    assert json.loads(partial.read_text())["ran"] == ["hardware", "targets"]
    capsys.readouterr()
    assert cli.main(["bench", "--show", str(partial)]) == 0
    assert "; cut short, not run: rollout" in capsys.readouterr().out.splitlines()[0]

    monkeypatch.setattr(suite, "_run_one", figures)
    assert cli.main(argv) == 0
    assert list(tmp_path.glob("*.json")) == [finished]
    assert "cut short" not in suite.format_results(json.loads(finished.read_text()))


def test_show_and_compare_go_alone(monkeypatch, capsys, tmp_path):
    path = _saved_run(
        monkeypatch, tmp_path / "run.json", gae=(1.0, 2.0, 4), memory_mib=1, other="o"
    )
    with pytest.raises(SystemExit):
        suite.main(["--show", path, "--compare", path, path])
    assert "not allowed with" in capsys.readouterr().err


def _ratios(prefix: str, ratios: dict) -> list[dict]:
    return [{"name": f"{prefix} {shape}", "ratio": ratio} for shape, ratio in ratios.items()]


def test_notes_name_the_horizon_from_which_a_method_beats_scan_at_every_batch():
    # From T = 1024 up the associative method is ahead at both batch sizes; at 64 it
    # is ahead at one of them only. pallas is ahead at 64 and at 8192, not at 1024.
    figures = _ratios(
        "gae map: associative",
        {"1x64": 2.0, "64x64": 0.5, "1x1024": 1.2, "64x1024": 1.5, "1x8192": 1.1, "64x8192": 3.0},
    ) + _ratios("gae map: pallas", {"1x64": 2.0, "1x1024": 0.9, "1x8192": 1.4})
    assert suite.settings_notes(figures) == [
        "gae map: associative ahead of scan at every batch size from T = 1024 up"
        " (measured at T = 64 to 8192)",
        "gae map: pallas ahead of scan at every batch size from T = 8192 up"
        " (measured at T = 64 to 8192)",
    ]
    behind = _ratios("gae map: associative", {"1x64": 2.0, "1x8192": 1.0})
    assert suite.settings_notes(behind) == [
        "gae map: associative behind or level with scan at some batch size even at T = 8192"
        " (measured at T = 64 to 8192)"
    ]


def test_notes_name_the_fastest_configuration_of_each_pallas_sweep():
    recursion = _ratios(
        "pallas recursion, triton, chunks of 32 steps, blocks of", {"32 rows": 0.9, "64 rows": 1.3}
    )
    fused = _ratios("pallas gae with a mask, chunks of 16 steps, blocks of", {"8 rows": 1.1})
    notes = suite.settings_notes(recursion + fused + [{"name": "gae auto 8x8", "ratio": 9.0}])
    assert notes == [
        "fastest pallas recursion, triton, chunks of 32 steps, blocks of 64 rows:"
        " 1.3x its defaults",
        "fastest pallas gae with a mask, chunks of 16 steps, blocks of 8 rows: 1.1x its defaults",
    ]


def _git(where, *args: str) -> str:
    command = ["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_results_name_the_commit_of_a_checkout_and_whether_it_was_changed(tmp_path):
    package = tmp_path / "valuefn"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'valuefn'\n")
    assert suite.source_revision(package) is None  # not a git work tree
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    commit = _git(tmp_path, "rev-parse", "HEAD")
    assert suite.source_revision(package) == {"commit": commit, "modified": False}
    (tmp_path / "notes.txt").write_text("untracked files change no figure\n")
    assert suite.source_revision(package)["modified"] is False
    (package / "__init__.py").write_text("x = 2\n")
    assert suite.source_revision(package) == {"commit": commit, "modified": True}
    # The table's first line names it.
    words = suite._source_words(suite.source_revision(package))
    assert words == f"; valuefn at {commit[:7]} with changes"
    assert suite._source_words(None) == ""


def test_an_installed_copy_inside_another_repository_has_no_commit(tmp_path):
    # valuefn installed into a virtual environment kept in some project's repository.
    package = tmp_path / "venv" / "site-packages" / "valuefn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'theirs'\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    assert suite.source_revision(package) is None
    # A valuefn/ at the top of a tree with no pyproject.toml is not a checkout either.
    top = tmp_path / "other"
    (top / "valuefn").mkdir(parents=True)
    (top / "valuefn" / "__init__.py").write_text("")
    _git(top, "init", "-q")
    _git(top, "add", ".")
    _git(top, "commit", "-q", "-m", "one")
    assert suite.source_revision(top / "valuefn") is None


def test_transformer_flops_counts_three_passes_for_training():
    shape = dict(d_model=8, num_layers=2, seq_len=4, tokens=10)
    forward = (24 * 2 * 8**2 + 4 * 2 * 4 * 8) * 10
    assert hardware.transformer_flops(**shape, training=False) == forward
    assert hardware.transformer_flops(**shape) == 3 * forward


def test_suite_imports_with_the_core_dependencies_only():
    """A machine with jax, flax (which brings rich), optax and chex runs the suite.

    orbax and matplotlib are the job's; torch and rlax are optional baselines.
    """
    blocked = ("orbax", "orbax.checkpoint", "matplotlib", "torch", "rlax")
    code = (
        "import sys, importlib\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import valuefn.cli\n"
        "from valuefn.bench import suite\n"
        "for name in suite.BENCHMARKS: importlib.import_module('valuefn.bench.' + name)\n"
        "from valuefn.bench import iteration\n"
        "assert 'orbax.checkpoint' not in sys.modules or sys.modules['orbax.checkpoint'] is None\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
