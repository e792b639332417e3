"""The testbed's quick mode, run as a user runs it, on a seed never used while tuning the testbed.

One ``ppd-diffusers testbed --quick --seed 7`` run (about 5 minutes on 2 CPU cores). Seeds 0-2 and 5 were
used while tuning (docs/guides/testbed.md says which and how); the claims below were fixed from seed 0
before seed 7 was first run. Two more were fixed then and **failed on seed 7**, so they are not asserted:
held-out mixture users' 95 % interval above 50 % and their win rate above pooled DPO's (seed 7, quick mode:
57 %, interval 47-67 %, against pooled DPO's 58 %; the full mode on seed 7 gives 65 %, 56-75 %, against 51 %).
What remains is far below the issue's targets (see the guide's diagnosis).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # one quick testbed run: ~5 minutes

UNTUNED_SEED = 7


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


def test_the_brightness_reward_user_is_served_beyond_the_base(quick_report):
    report, _ = quick_report
    brightness = report["multi_reward"]["per_reward"]["brightness"]
    assert brightness["ppd"] > brightness["base"] + 0.5, brightness  # seed 7: +2.36 against +0.06


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
