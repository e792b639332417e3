"""The README's main command runs and shows what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_learns_each_users_preference():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "120"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    log = result.stderr
    assert "first loss 0.6931" in log
    pattern = r"user ([AB]): implicit accuracy with own embedding ([\d.]+), with the other user's ([\d.]+)"
    found = re.findall(pattern, log)
    assert [user for user, _, _ in found] == ["A", "B"]
    for _, own, other in found:
        assert float(own) >= 0.9 and float(other) <= 0.1
    assert "saved and reloaded the adapter" in log
