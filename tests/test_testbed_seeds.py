"""``ppd_diffusers.testbed.seeds``: the testbed on several seeds, summarized figure by figure and target by target."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ppd_diffusers.testbed.loop import TestbedConfig
from ppd_diffusers.testbed.seeds import _mode_of, run_testbed_seeds, seeds_markdown, summarize_seeds

from .test_testbed_run import MICRO

REWARDS = ("brightness", "saturation", "warmth", "centring")


def report(share=0.9, bound=1.0, heldout=0.9, ci_low=0.8, single=0.9, monotone=True) -> dict:
    """A report as ``run_testbed`` writes it, with only what the summary reads; PPD = base + share * bound gain."""
    per_reward = {
        r: {"base": 0.0, "pooled_dpo": 0.1, "ppd": share * bound, "single_reward_dpo": bound, "share_of_bound": share}
        for r in REWARDS
    }
    win = lambda mean, low=0.5: {"win_rate_mean": mean, "win_rate_ci95": [low, 1.0]}  # noqa: E731
    return {
        "multi_reward": {"per_reward": per_reward, "prompt_colour": dict.fromkeys(REWARDS, 1.0)},
        "mixtures": {
            "heldout_users": win(heldout, ci_low),
            "heldout_mixed_users": win(0.8),
            "heldout_pooled_dpo": win(0.5),
            "single_reward_users": dict.fromkeys(REWARDS, single),
        },
        "interpolation": {"monotone": {"brightness": True, "warmth": monotone}},
        "seconds": 100.0,
    }


def test_figures_per_seed_with_mean_and_range_and_a_small_bound_left_out():
    summary = summarize_seeds({3: report(share=0.9), 4: report(share=0.5), 5: report(bound=0.2)}, "quick")
    assert summary["seeds"] == [3, 4, 5] and summary["mode"] == "quick"
    share = summary["figures"]["multi-reward: PPD's share of the warmth bound"]
    assert share["values"] == [0.9, 0.5, None]  # seed 5's bound gained 0.2 SD: no share to judge
    assert share["mean"] == pytest.approx(0.7) and (share["min"], share["max"]) == (0.5, 0.9)
    gap = summary["figures"]["multi-reward: PPD minus pooled DPO, saturation (SD)"]
    assert gap["values"] == pytest.approx([0.8, 0.4, 0.08])
    assert summary["figures"]["seconds"]["mean"] == 100.0


def test_targets_are_judged_per_seed_as_issue_12_states_them():
    reports = {
        1: report(),  # every target
        2: report(share=0.55, heldout=0.86, ci_low=0.7, single=0.75, monotone=False),  # misses all but one
        3: report(bound=0.3),  # no bound of +0.5 SD: the share target does not apply
    }
    targets = summarize_seeds(reports, "quick")["targets"]
    assert targets["PPD >= 60 % of every bound that gains >= +0.5 SD"] == {"met": [1], "judged": [1, 2]}
    assert targets["held-out users >= 85 %, 95 % CI low > 75 %"]["met"] == [1, 3]
    assert targets["every single-reward user >= 80 %"]["met"] == [1, 3]
    assert targets["interpolation monotone in both rewards"]["met"] == [1, 3]
    assert targets["PPD above pooled DPO on every reward"]["met"] == [1, 2, 3]
    nobody = report()
    nobody["mixtures"]["heldout_mixed_users"]["win_rate_mean"] = None  # no held-out user without a dominant reward
    mixed = summarize_seeds({1: report(), 2: nobody}, "quick")
    assert mixed["targets"]["held-out users not dominated by one reward >= 75 %"] == {"met": [1], "judged": [1]}
    assert mixed["figures"]["mixtures: held-out users not dominated by one reward"]["values"] == [0.8, None]
    full = summarize_seeds({1: report(share=0.7)}, "full")["targets"]
    assert full["PPD >= 80 % of every bound that gains >= +0.5 SD"] == {"met": [], "judged": [1]}
    text = seeds_markdown(summarize_seeds(reports, "quick"))
    assert "| held-out users >= 85 %, 95 % CI low > 75 % | 2 of 3 (1, 3) |" in text
    assert "| multi-reward: PPD's share of the warmth bound | 90 % | 55 % | - | 73 % | 55 % to 90 % |" in text


def test_bad_seeds_or_mode_are_refused_before_any_run(tmp_path):
    config = TestbedConfig.quick()
    for seeds in ([3], [3, 3]):
        with pytest.raises(ValueError, match="at least two distinct seeds"):
            run_testbed_seeds(config, seeds, tmp_path, "quick")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        run_testbed_seeds(config, [1, 2], tmp_path, "medium")
    assert not any(tmp_path.iterdir())


def test_the_mode_is_the_preset_the_configuration_is_whatever_its_seed_and_workers(tmp_path):
    assert _mode_of(TestbedConfig.quick(seed=18)) == "quick"
    full = TestbedConfig.full(seed=19)
    full.workers = 1  # how long a run takes, not what it finds
    assert _mode_of(full) == "full"
    changed = replace(TestbedConfig.full(), dpo_steps=200)  # neither preset: judged against which share?
    with pytest.raises(ValueError, match="pass mode='quick' or mode='full'"):
        run_testbed_seeds(changed, [1, 2], tmp_path)
    with pytest.raises(ValueError, match="neither"):
        _mode_of(replace(TestbedConfig.quick(), prompts=["a red circle"]))
    assert not any(tmp_path.iterdir())


def test_micro_runs_on_two_seeds_write_each_report_and_a_summary_read_from_them(tmp_path):
    config = replace(TestbedConfig.quick(), **MICRO)
    summary = run_testbed_seeds(config, [2, 5], tmp_path, "quick")  # MICRO is neither preset
    reports = [json.loads((tmp_path / f"seed-{s}" / "report.json").read_text()) for s in (2, 5)]
    assert [r["config"]["seed"] for r in reports] == [2, 5]
    assert json.loads((tmp_path / "seeds.json").read_text()) == summary
    heldout = summary["figures"]["mixtures: held-out users"]["values"]
    assert heldout == [r["mixtures"]["heldout_users"]["win_rate_mean"] for r in reports]
    assert (tmp_path / "seeds.md").read_text() == seeds_markdown(summary)

    # resuming keeps the finished reports of the same configuration (the run times would differ on a rerun)...
    assert run_testbed_seeds(config, [2, 5], tmp_path, "quick", resume=True) == summary
    # ...and runs again a seed whose report came from another configuration
    other = run_testbed_seeds(replace(config, dpo_steps=4), [2, 5], tmp_path, "quick", resume=True)
    assert all(a != b for a, b in zip(other["figures"]["seconds"]["values"], summary["figures"]["seconds"]["values"]))
    assert json.loads((tmp_path / "seed-5" / "report.json").read_text())["config"]["dpo_steps"] == 4
