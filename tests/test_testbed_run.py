"""The synthetic-user testbed end to end on a micro configuration, its CLI and its shipped base model.

The method's claims on the quick configuration are asserted in ``test_testbed_claims.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from ppd_diffusers.testbed.base_model import BASE_MODEL_DIR, load_base_pipeline
from ppd_diffusers.testbed.evaluate import color_accuracy
from ppd_diffusers.testbed.loop import TestbedConfig
from ppd_diffusers.testbed.run import run_testbed
from ppd_diffusers.testing_utils import save_random_clip

CLI = [sys.executable, "-m", "ppd_diffusers.cli"]
MICRO = dict(
    pool_per_prompt=2, sample_steps=2, num_train_users=1, num_heldout_users=2, train_pairs_per_user=4, dpo_steps=3,
    reward_user_pairs=4, reward_steps=1, reward_eval_samples=2, eval_samples_per_user=2, eval_train_users=1,
    probe_users=4, interpolation_weights=2,
)  # fmt: skip


def test_micro_run_writes_the_report_and_seeds_reproduce(tmp_path):
    configs = [replace(TestbedConfig.quick(seed), **MICRO) for seed in (0, 0, 1)]
    runs = [run_testbed(config, tmp_path / f"{i}") for i, config in enumerate(configs)]
    names = ("report.json", "report.md", "multi_reward.png", "interpolation.png", "samples_saturation.png")
    for name in names:
        assert (tmp_path / "0" / name).is_file(), name
    saved = json.loads((tmp_path / "0" / "report.json").read_text())
    table = saved["multi_reward"]["per_reward"]
    assert set(table) == {"brightness", "saturation", "warmth", "centring"}
    for row in table.values():
        assert set(row) == {"base", "pooled_dpo", "ppd", "single_reward_dpo", "share_of_bound"}
        gain = row["single_reward_dpo"] - row["base"]
        if gain > 0:
            assert row["share_of_bound"] == pytest.approx((row["ppd"] - row["base"]) / gain)
    colour = saved["multi_reward"]["prompt_colour"]
    assert set(colour) == {"base", *table} and all(0 <= v <= 1 for v in colour.values())
    mixtures = saved["mixtures"]
    assert len(mixtures["heldout_users"]["win_rates"]) == 2
    assert set(mixtures["single_reward_users"]) == set(table)
    assert mixtures["heldout_pooled_dpo"]["users"] == 2
    assert saved["interpolation"]["weights"] == [0.0, 1.0]
    assert "Multi-reward experiment" in (tmp_path / "0" / "report.md").read_text()
    for run in runs:
        run.pop("seconds"), run.pop("phase_seconds")
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_micro_run_takes_another_encoder(tmp_path):
    save_random_clip(tmp_path / "clip")
    report = run_testbed(replace(TestbedConfig.quick(), **MICRO), tmp_path / "out", encoder=tmp_path / "clip")
    assert (tmp_path / "out" / "report.md").is_file()
    assert report["identification_probe"]["encoder"]["users"] == MICRO["probe_users"]


def test_cli_trains_a_base_model(tmp_path):
    result = subprocess.run(
        [*CLI, "train-testbed-base", "--output", str(tmp_path / "base"), "--steps", "2", "--batch_size", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = load_base_pipeline(tmp_path / "base")
    assert pipe.prior.config.in_channels == 3 and pipe.config.resolution_multiple == 1.0
    help_text = subprocess.run([*CLI, "testbed", "--help"], capture_output=True, text=True, timeout=300).stdout
    assert "--quick" in help_text and "--seed" in help_text and "--encoder" in help_text


def test_shipped_base_model_loads_and_follows_prompts():
    assert (BASE_MODEL_DIR / "model_index.json").is_file()
    assert color_accuracy(load_base_pipeline(), samples_per_prompt=4) >= 0.8  # chance: 0.25; measured 0.98


def test_cli_refuses_bad_arguments_before_any_compute(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    cases = [
        (["testbed", "--quick", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["testbed", "--quick", "--workers", "0"], "argument --workers: must be at least 1, got 0"),
        (["testbed", "--quick", "--seed", "3", "4", "3"], "argument --seed: the seeds must differ, got 3 4 3"),
        (["testbed", "--quick", "--resume"], "argument --resume: only with several seeds"),
        (["testbed", "--quick", "--out", str(blocked / "report")], "--out"),
        (["testbed-oracles", "--quick", "--out", str(blocked / "oracles")], "is not a writable folder"),
        (["testbed-oracles", "--seed", "-2"], "argument --seed: must be at least 0, got -2"),
        (["train-testbed-base", "--output", str(tmp_path / "b"), "--batch_size", "0"], "must be at least 1, got 0"),
        (["train-testbed-encoder", "--output", str(tmp_path / "e"), "--steps", "x"], "expected an integer, got 'x'"),
    ]
    for argv, message in cases:
        proc = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (
        "is not a writable folder"
        in subprocess.run(
            [*CLI, "testbed", "--out", str(blocked / "r")], capture_output=True, text=True, timeout=600
        ).stderr
    )


def test_adapters_trained_side_by_side_equal_those_trained_one_at_a_time():
    import numpy as np
    import torch

    from ppd_diffusers.testbed.loop import make_pool, user_pairs
    from ppd_diffusers.testbed.rewards import single_reward_users
    from ppd_diffusers.testbed.training import TrainingJob, train_adapters

    config = replace(TestbedConfig.quick(), **MICRO, tie_margin=0.5, stratified_timesteps=True, ema_decay=0.5)
    pipe = load_base_pipeline()
    pool = make_pool(pipe, config)
    users = single_reward_users()[:2]
    training = [user_pairs(pool, u, 6, np.random.default_rng(0), config.tie_margin) for u in users]
    embeds = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(0))
    jobs = [TrainingJob(training, embeds, "ppd"), TrainingJob(training[:1], embeds[:1], "bound")]
    threads = torch.get_num_threads()
    here = train_adapters(pipe, pool, jobs, 8, replace(config, workers=1), steps=3)
    workers = train_adapters(pipe, pool, jobs, 8, replace(config, workers=2), steps=3)
    assert torch.get_num_threads() == threads  # each training ran single-threaded; the caller's count is back
    broken = TrainingJob(training, embeds[:1], "one embedding for two users")  # fails inside its thread
    with pytest.raises(IndexError):
        train_adapters(pipe, pool, [broken, *jobs], 8, config, steps=3)
    assert torch.get_num_threads() == threads
    for a, b in zip(here, workers, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    assert not torch.equal(here[0].to_v_user[0].weight, here[1].to_v_user[0].weight)  # the jobs differ
    assert here[0].to_v_user[0].weight.abs().sum() > 0  # V' starts at zero: trained
