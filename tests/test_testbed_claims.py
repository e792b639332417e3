"""The testbed's quick mode, run as a user runs it, on a seed never used while tuning the testbed.

One ``ppd-diffusers testbed --quick --seed 17`` run (about 6 minutes on 2 CPU cores). Seeds 0-5, 7, 11 and 13
were used while tuning or seen before the configuration was fixed (docs/guides/testbed.md says which and how).
The claims were written before seed 17 was first run, from what the tuning seeds supported:
- every reward whose bound moves at least +0.5 SD is moved the right way by PPD;
- the brightness reward-user gains more than +0.5 SD;
- the reward-users' images keep the prompt's colour at least half of the time;
- held-out mixture users win above chance and above pooled DPO.

Not asserted, because the last tuning runs already fell short:
- PPD above pooled DPO on every reward. On seed 13, saturation reached +0.76 against pooled DPO's +1.02 and
  warmth +0.51 against +0.94.
- The issue's other quick-mode targets. On seed 11, saturation reached 34 % of its bound against a target of
  60 %, and warmth was not monotone along the interpolation.

The guide's results section has seed 17's numbers against every target.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # one quick testbed run: ~6 minutes

UNTUNED_SEED = 17


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    command = [sys.executable, "-m", "ppd_diffusers.cli", "testbed", "--quick", "--seed", str(UNTUNED_SEED)]
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Multi-reward experiment" in result.stdout  # the command prints its report
    return json.loads((out / "report.json").read_text()), out


def test_multi_reward_ppd_moves_every_learnable_reward_its_users_way(quick_report):
    report, _ = quick_report
    for name, row in report["multi_reward"]["per_reward"].items():
        if row["single_reward_dpo"] - row["base"] >= 0.5:  # a reward the base model can be moved on
            assert row["ppd"] > row["base"], (name, row)


def test_reward_users_images_keep_the_prompts_colour(quick_report):
    report, _ = quick_report
    colour = report["multi_reward"]["prompt_colour"]
    assert colour["base"] >= 0.9, colour
    assert all(colour[name] >= 0.5 for name in report["multi_reward"]["per_reward"]), colour


def test_the_brightness_reward_user_is_served_beyond_the_base(quick_report):
    report, _ = quick_report
    brightness = report["multi_reward"]["per_reward"]["brightness"]
    assert brightness["ppd"] > brightness["base"] + 0.5, brightness


def test_heldout_users_from_4_pairs_win_above_chance_and_above_pooled_dpo(quick_report):
    report, _ = quick_report
    heldout, pooled = report["mixtures"]["heldout_users"], report["mixtures"]["heldout_pooled_dpo"]
    assert heldout["win_rate_ci95"][0] > 0.5, heldout
    assert heldout["win_rate_mean"] > pooled["win_rate_mean"], (heldout, pooled)


def test_quick_report_is_complete(quick_report):
    report, out = quick_report
    rewards = report["multi_reward"]["per_reward"]
    for name in ("report.md", "multi_reward.png", "interpolation.png", *(f"samples_{r}.png" for r in rewards)):
        assert (out / name).is_file(), name
    probe = report["identification_probe"]["encoder"]
    assert probe["top5"] > 1.5 * probe["chance_top5"]
    mixtures = report["mixtures"]
    assert set(mixtures["single_reward_users"]) == set(rewards)
    assert mixtures["heldout_users"]["users"] >= 24 and mixtures["heldout_pooled_dpo"]["users"] >= 24
