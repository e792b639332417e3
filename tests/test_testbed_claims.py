"""The testbed's quick mode, run as a user runs it, holds PPD's basic claims with margins beyond noise.

One ``ppd-diffusers testbed --quick`` run (about 2.5 minutes on 2 CPU cores). The margins are 95 %
bootstrap intervals over users, so a claim holds only if most users, not a lucky few, are served.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # one quick testbed run: ~2.5 minutes


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    result = subprocess.run(
        [sys.executable, "-m", "ppd_diffusers.cli", "testbed", "--quick", "--seed", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Held-out users" in result.stdout  # the command prints its report
    return json.loads((out / "report.json").read_text()), out


def test_ppd_beats_the_base_for_training_users_on_their_own_rewards(quick_report):
    report, _ = quick_report
    train = report["train_users"]
    assert len(train["win_rates"]) >= 24
    assert train["win_rate_ci95"][0] > 0.5, train
    assert train["own_reward_gain_mean"] > 0.15, train


def test_heldout_users_from_four_pairs_win_more_often_than_chance(quick_report):
    report, _ = quick_report
    heldout = report["heldout_users"]
    assert len(heldout["win_rates"]) >= 24
    assert heldout["win_rate_ci95"][0] > 0.55, heldout


def test_quick_report_is_complete(quick_report):
    report, out = quick_report
    for name in ("report.md", "interpolation.png", *(f"samples_{r}.png" for r in report["per_reward"])):
        assert (out / name).is_file(), name
    probe = report["identification_probe"]["encoder"]
    assert probe["top5"] > 1.5 * probe["chance_top5"]  # measured 2x
    # the brightness user, the clearest axis, is served far beyond the base
    brightness = report["per_reward"]["brightness"]
    assert brightness["ppd_single_reward_user"] > brightness["base"] + 0.5
