"""The training iteration and the ``valuefn train`` command on a tiny dialogue task."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx

import valuefn
from valuefn import cli, job
from valuefn.envs import DialogueConfig
from valuefn.train import init_train_state

TINY_TASK = DialogueConfig(
    vocab_size=12,
    prompt_length=4,
    num_turns=2,
    turn_length=4,
    user_length=2,
    turn_weights=(1.0, 0.5),
    hidden_size=8,
)
TINY = job.TrainConfig(
    iterations=3,
    batch_size=16,
    num_epochs=2,
    num_minibatches=2,
    learning_rate=3e-3,
    checkpoint_every=2,
    critic=job.CriticConfig(d_model=16, num_layers=1, num_heads=2),
    task=TINY_TASK,
)
TINY_TOML = """
iterations = 3
batch_size = 16
num_epochs = 2
num_minibatches = 2
checkpoint_every = 2

[critic]
d_model = 16
num_layers = 1
num_heads = 2

[task]
vocab_size = 12
prompt_length = 4
num_turns = 2
turn_length = 4
user_length = 2
turn_weights = [1.0, 0.5]
hidden_size = 8
"""


def test_sequence_layout_inverts_response_values():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 5)).astype(np.float32)
    mask = rng.random((3, 5)) > 0.3
    placed = job.to_sequence_layout(jnp.asarray(values), prompt_length=4)
    assert placed.shape == (3, 9)
    aligned, _ = valuefn.response_values(placed, 4, mask)
    np.testing.assert_array_equal(aligned, np.where(mask, values, 0.0))


def make_iteration(config):
    optimizer = job.make_optimizer(config)
    graphdef, state = init_train_state(job.make_critic(config), optimizer)
    return jax.jit(job.make_iteration(config, graphdef, optimizer)), state


def test_iteration_targets_and_metrics_match_numpy():
    # gamma < 1, lambda apart from it, the k3 estimator and a critic with a random
    # head, so that a mix-up of any two of them shows.
    config = dataclasses.replace(TINY, gamma=0.9, lam=0.5, kl_coef=0.3, kl_estimator="k3")
    optimizer = job.make_optimizer(config)
    critic = job.make_critic(config)
    rng = np.random.default_rng(0)
    critic.head.kernel[...] = jnp.asarray(rng.normal(size=critic.head.kernel.shape), jnp.float32)
    graphdef, state = init_train_state(critic, optimizer)
    stages = job.make_stages(config, graphdef, optimizer)
    key = jax.random.key(3)
    rollout = jax.jit(stages.rollout)(jax.random.split(key)[0])
    targets = jax.tree.map(np.asarray, jax.jit(stages.targets)(state, rollout))
    _, metrics = jax.jit(job.make_iteration(config, graphdef, optimizer))(state, key)
    d = jax.tree.map(np.asarray, rollout.dialogues)
    mask, p = d.assistant_mask, config.task.prompt_length
    horizon = mask.shape[-1]

    log_ratio = d.logprobs.astype(np.float64) - d.ref_logprobs
    kl = np.exp(-log_ratio) - 1 + log_ratio  # k3
    rewards = np.where(mask, -config.kl_coef * kl, 0.0)
    values, discounts = np.zeros(mask.shape), np.zeros(mask.shape)
    realised = np.zeros(mask.shape)
    for b in range(len(mask)):
        steps = np.flatnonzero(mask[b])
        rewards[b, steps[-1]] += d.scores[b]
        values[b, steps] = targets.batch.old_values[b, p - 1 + steps]
        discounts[b, steps[:-1]] = config.gamma  # the episode ends at the last token
        for t in steps:
            realised[b, t] = rewards[b, steps[steps >= t]].sum()
    np.testing.assert_allclose(rollout.rewards, rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets.values, values, rtol=1e-6)
    returns = ref.lambda_returns(rewards, values, discounts, np.zeros(len(mask)), 0.5, mask=mask)
    np.testing.assert_allclose(targets.returns, returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets.realised, realised, rtol=1e-5, atol=1e-5)
    # The batch at the critic's positions: step t at P - 1 + t, nothing elsewhere.
    placed = np.zeros((len(mask), p + horizon), bool)
    placed[:, p - 1 : p - 1 + horizon] = mask
    np.testing.assert_array_equal(targets.batch.mask, placed)
    np.testing.assert_allclose(targets.batch.targets[:, p - 1 : -1], returns, atol=1e-5)

    expected = {
        "kl_mean": kl[mask].mean(),
        "return_mean": returns[mask].mean(),
        "score_mean": d.scores.mean(),
        "explained_variance": ref.explained_variance(values, returns, mask),
        "value_by_turn": [values[mask & (d.turn == k)].mean() for k in range(2)],
        "return_by_turn": [realised[mask & (d.turn == k)].mean() for k in range(2)],
    }
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_iteration_without_value_clipping():
    # clip_epsilon = 0 turns the clip off: the batch then carries no old values.
    iteration, state = make_iteration(dataclasses.replace(TINY, clip_epsilon=0.0))
    state, metrics = iteration(state, jax.random.key(0))
    assert np.isfinite(float(metrics["value_loss"])) and float(metrics["clip_fraction"]) == 0.0


def test_iteration_improves_explained_variance():
    iteration, state = make_iteration(TINY)
    evs = []
    for i in range(25):
        state, metrics = iteration(state, jax.random.key(i))
        evs.append(float(metrics["explained_variance"]))
    assert np.all(np.isfinite(evs))
    assert np.mean(evs[-5:]) > np.mean(evs[:3]) + 0.2, evs


def test_iteration_vmaps_over_seeds():
    config = TINY
    optimizer = job.make_optimizer(config)
    graphdef, _ = init_train_state(job.make_critic(config), optimizer)
    states = [
        init_train_state(job.make_critic(dataclasses.replace(config, seed=s)), optimizer)[1]
        for s in (0, 1)
    ]
    iteration = job.make_iteration(config, graphdef, optimizer)
    keys = jax.random.split(jax.random.key(7), 2)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    batched, batched_metrics = jax.jit(jax.vmap(iteration))(stacked, keys)
    for s in (0, 1):
        single, single_metrics = jax.jit(iteration)(states[s], keys[s])
        np.testing.assert_allclose(
            batched_metrics["value_loss"][s], single_metrics["value_loss"], rtol=1e-4
        )
        for a, b in zip(
            jax.tree.leaves(single.params),
            jax.tree.leaves(jax.tree.map(lambda x, s=s: x[s], batched.params)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def metrics_of(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_train_command_writes_every_output_and_resumes_identically(tmp_path, capsys):
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(TINY_TOML)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["train", "--config", str(config_file), "--quiet"]

    assert cli.main([*args, "--out", str(straight)]) == 0
    lines = metrics_of(straight)
    assert [line["iteration"] for line in lines] == [1, 2, 3]
    for key in ("value_loss", "explained_variance", "clip_fraction", "grad_norm", "score_mean"):
        assert all(np.isfinite(line[key]) for line in lines), key
    for name in ("curves.png", "value_by_turn.png", "config.json"):
        assert (straight / name).stat().st_size > 0, name
    assert (straight / "checkpoint").is_dir()
    assert "Value against realised return by assistant turn" in capsys.readouterr().out

    assert cli.main([*args, "--iterations", "2", "--out", str(resumed)]) == 0
    assert cli.main([*args, "--out", str(resumed), "--resume"]) == 0
    resumed_lines = metrics_of(resumed)
    assert [line["iteration"] for line in resumed_lines] == [1, 2, 3]
    assert [line["value_loss"] for line in resumed_lines] == [line["value_loss"] for line in lines]

    # Stopped after iteration 3 was logged but before its checkpoint was written:
    # the resumed run drops that line and trains iteration 3 again from checkpoint 2.
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoint" / "3")
    assert cli.main([*args, "--out", str(crashed), "--resume"]) == 0
    crashed_lines = metrics_of(crashed)
    assert [line["iteration"] for line in crashed_lines] == [1, 2, 3]
    assert [line["value_loss"] for line in crashed_lines] == [line["value_loss"] for line in lines]


def test_resume_keeps_the_runs_own_settings(tmp_path, capsys):
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(TINY_TOML)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config_file), "--quiet", "--out", str(run)]) == 0
    resume = ["train", "--quiet", "--out", str(run), "--resume"]
    capsys.readouterr()

    for argv_tail, message in [
        ([], "has trained 3 iterations already; pass --iterations above 3"),
        (["--iterations", "3"], "pass --iterations above 3"),
        (["--iterations", "4", "--gamma", "0.5"], "gamma (1.0 in the run, 0.5 asked)"),
        (["--iterations", "4", "--lam", "0.5"], "lam (0.95 in the run, 0.5 asked)"),
        (["--iterations", "4", "--seed", "5"], "seed (0 in the run, 5 asked)"),
        (["--iterations", "4", "--config", str(tmp_path / "wide.toml")], "critic.d_model (16"),
    ]:
        (tmp_path / "wide.toml").write_text("[critic]\nd_model = 32")
        assert cli.main([*resume, *argv_tail]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err

    # A new run must not write its checkpoints among the run's.
    assert cli.main(["train", "--quiet", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of a run" in err, err

    # No --config: the tiny critic and task come from the run's config.json.
    assert cli.main([*resume, "--iterations", "4"]) == 0
    assert [line["iteration"] for line in metrics_of(run)] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["critic"]["d_model"] == 16


def test_distributed_resume_starts_the_runtime_before_reading_the_checkpoints(tmp_path):
    from test_distributed import free_port

    config_file = tmp_path / "tiny.toml"
    config_file.write_text(TINY_TOML)
    run = tmp_path / "run"
    argv = ["train", "--config", str(config_file), "--quiet", "--out", str(run)]
    assert cli.main([*argv, "--iterations", "2"]) == 0
    # jax.distributed must start before any backend, so the job runs in a fresh process.
    address = f"127.0.0.1:{free_port()}"
    cluster = ["--coordinator-address", address, "--num-processes", "1", "--process-id", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "valuefn.cli", *argv, "--resume", "--distributed", *cluster],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "VALUEFN_HUGE_PAGES": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line["iteration"] for line in metrics_of(run)] == [1, 2, 3]


@pytest.mark.parametrize(
    "argv_tail, contents, message",
    [
        (["--iterations", "many"], None, "invalid int"),
        (["--gamma", "1.5"], None, "gamma"),
        (["--bogus"], None, "unrecognized"),
        ([], "iterations = [", "not valid TOML"),
        ([], "learning_rat = 0.1", "learning_rat"),
        ([], "[task]\nnum_turns = 0", "num_turns"),
        ([], "num_minibatches = 5", "num_minibatches"),
        ([], "checkpoint_every = 0", "checkpoint_every must be >= 1"),
        ([], "seed = 1.5", "seed must be an integer"),
        ([], "[critic]\nnum_heads = 3", "num_heads=3 must divide d_model=64"),
        ([], '[task]\nturn_weights = [1, 2, "x"]', "turn_weights must be a list of finite numbers"),
        (["--seed", str(2**64)], None, "seed must lie in [0, 2**32)"),
        (["--gamma", "1.5"], "seed = 1", "flags: gamma"),
        (["--fsdp", "3"], None, "--fsdp"),
        (["--fsdp", "0"], None, "--fsdp must be >= 1, got 0"),
        (["--num-processes", "2"], None, "need --distributed"),
        (["--distributed", "--num-processes", "0"], None, "--distributed: num_processes must"),
        (
            ["--distributed", "--num-processes", "2", "--process-id", "5"],
            None,
            "--distributed: process_id must lie in [0, 2), got 5",
        ),
    ],
)
def test_bad_flags_and_config_exit_2_with_one_line(tmp_path, capsys, argv_tail, contents, message):
    argv = ["train", "--out", str(tmp_path / "run"), *argv_tail]
    if contents is not None:
        config_file = tmp_path / "bad.toml"
        config_file.write_text(contents)
        argv += ["--config", str(config_file)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_or_a_resume_without_a_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["train", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "file" / "run")]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "empty" / "checkpoint").mkdir(parents=True)
    assert cli.main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_undervalued_early_turns_are_reported():
    from valuefn import report

    metrics = {"value_by_turn": [0.1, 0.3, 1.0], "return_by_turn": [1.0, 1.0, 1.0]}
    assert report.undervalued_turns(metrics) == [0, 1]
    metrics = {"value_by_turn": [0.95, 1.02, 1.0], "return_by_turn": [1.0, 1.0, 1.0]}
    assert report.undervalued_turns(metrics) == []
    # A NaN return (a turn no dialogue reached) neither hides nor invents a warning.
    for returns in ([np.nan, 1.0, 1.0], [1.0, np.nan, 1.0]):
        metrics = {"value_by_turn": [0.0, 0.0, 0.0], "return_by_turn": returns}
        assert report.undervalued_turns(metrics) == [k for k in (0, 1) if returns[k] == 1.0]


def test_summary_prints_each_turns_value_return_and_their_difference(tmp_path):
    from rich.console import Console

    from valuefn import report

    metrics = {
        "iteration": 3,
        "value_loss": 0.5,
        "explained_variance": 0.25,
        "clip_fraction": 0.0,
        "score_mean": 1.0,
        "value_by_turn": [0.2, 0.9],
        "return_by_turn": [1.0, 1.0],
    }
    console = Console(record=True, width=120)
    report.print_summary(metrics, tmp_path, console)
    text = console.export_text()
    assert "0.200" in text and "-0.800" in text and "-0.100" in text
    assert "turn 0 is valued at 0.200 but realises 1.000" in text


def test_curves_plot_histories_with_non_finite_metrics(tmp_path):
    from valuefn import report

    history = [
        {"iteration": i + 1, "value_loss": loss, "explained_variance": ev}
        for i, (loss, ev) in enumerate([(1.0, -np.inf), (np.nan, np.nan), (0.5, 0.3)])
    ]
    for length in (1, 3):
        report.plot_curves(history[:length], tmp_path / "curves.png")
        assert (tmp_path / "curves.png").stat().st_size > 0


def test_critic_table_scans_the_layers_when_asked():
    config = job.config_from_dict({"critic": {"num_layers": 3, "scan_layers": True}})
    critic = job.make_critic(config)
    kernel = critic.blocks.fc.kernel  # one Block whose arrays carry the layer axis
    assert critic.scan_layers and kernel.shape[0] == 3
    assert not job.make_critic(job.config_from_dict({})).scan_layers


def test_critic_table_masks_the_padding_when_asked():
    critic = job.make_critic(job.config_from_dict(tomllib.loads("[critic]\nmask_padding = true")))
    assert critic.pad_id == valuefn.envs.dialogue.PAD
    assert job.make_critic(job.config_from_dict({})).pad_id is None
    with pytest.raises(ValueError, match="mask_padding"):
        job.config_from_dict({"critic": {"mask_padding": "yes"}})
    # The iteration's values are the masked critic's, not the unmasked one's.
    config = dataclasses.replace(TINY, critic=job.CriticConfig(16, 1, 2, mask_padding=True))
    optimizer = job.make_optimizer(config)
    critic = job.make_critic(config)
    critic.head.kernel[...] = jnp.asarray(
        np.random.default_rng(0).normal(size=critic.head.kernel.shape), jnp.float32
    )
    graphdef, state = init_train_state(critic, optimizer)
    stages = job.make_stages(config, graphdef, optimizer)
    rollout = jax.jit(stages.rollout)(jax.random.key(3))
    tokens = rollout.dialogues.tokens
    values = valuefn.predict(graphdef, state.params, tokens)
    unmasked = nnx.merge(graphdef, state.params)(tokens, jnp.ones(tokens.shape, bool))
    assert not np.allclose(values, unmasked, atol=1e-3)
    targets = jax.jit(stages.targets)(state, rollout)
    p, mask = config.task.prompt_length, np.asarray(rollout.dialogues.assistant_mask)
    old = np.asarray(targets.batch.old_values)[:, p - 1 : -1]
    np.testing.assert_allclose(old[mask], np.asarray(values)[:, p - 1 : -1][mask], rtol=1e-6)
