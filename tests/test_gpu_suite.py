"""``benchmarks/gpu_suite.py``: its ``--tiny`` mode runs every section's code on the CPU, the budget skips
sections, and the committed GPU tables are what the script generates from the committed JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    # generous timeout: the suite takes well under a minute on 2 idle cores, but CI machines can be loaded
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    yield gpu_suite
    sys.path.remove(str(SUITE.parent))


@pytest.mark.slow
def test_tiny_mode_runs_every_section(tmp_path, suite):
    out = tmp_path / "suite.json"
    proc = _run("--tiny", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["tiny"] and set(result["versions"]) == set(suite.PACKAGES)
    sections = result["sections"]
    assert list(sections) == list(suite.SECTIONS)
    failed = {name: s for name, s in sections.items() if "error" in s or "skipped" in s}
    assert not failed
    assert [r["batch"] for r in sections["step"]["rows"]] == [2, 4]
    assert all(r["compiled"] == "regional" for r in sections["step_compiled"]["rows"])
    assert {sections[k]["compiled"] for k in ("prior", "prior_compiled", "prior_whole_graph")} == {
        "eager",
        "regional",
        "whole graph",
    }
    training = sections["training"]["rows"] + sections["training_compiled"]["rows"]
    assert len(training) == 5 and all(r["pairs_per_s"] > 0 for r in training)
    assert sections["training"]["full_dpo_baseline"]["pairs_per_s"] > 0
    assert [r["layer"] for r in sections["encoder"]["rows"]] == [-1, 2]
    backbones = sections["backbones"]
    assert [(r["backbone"], r["batch"]) for r in backbones["rows"]] == [
        ("sdxl", 2),
        ("sdxl", 4),
        ("flux", 2),
        ("flux", 4),
    ]
    assert backbones["dpo"]["pairs"] == 2 and backbones["dpo"]["step_s"] > 0
    assert sum(t["target"].startswith("personalized SDXL step") for t in result["targets"]) == 2
    # judged wherever something was measured; a CPU run has no peak memory for the SDXL DPO step
    assert all((t["met"] is None) == (t["measured"] is None) for t in result["targets"])
    assert [t["met"] for t in result["targets"] if "DPO step of 2 pairs" in t["target"]] == [None]
    # the table beside the JSON is generated from it, and says the targets are not judged on a tiny run
    table = out.with_suffix(".md").read_text()
    assert table == suite.markdown(result)
    assert "not judged (tiny CPU run)" in table and "| whole graph | 3 |" in table
    assert "SDXL and Flux steps (`bench_backbones`): float32" in table and "| Flux | 4 |" in table


def test_the_backbones_section_is_judged_and_tabulated(suite):
    """A GPU-like ``backbones`` section (hand-written figures) gets its targets and tables in the report."""
    rows = [
        {"backbone": "sdxl", "batch": 2, "plain_ms": 80.0, "user_ms": 82.0, "ratio_user": 1.025},
        {"backbone": "flux", "batch": 8, "plain_ms": 2000.0, "user_ms": 2100.0, "ratio_user": 1.05},
    ]
    for row in rows:
        row.update(attached_no_user_ms=row["plain_ms"], ratio_attached_no_user=1.0, peak_bytes={"plain": 2**33})
    backbones = {
        "settings": {"dtype": "bfloat16", "rounds": 10, "warmup": 2, "user_tokens": 64, "user_token_dim": 768,
                     "backbones": {"sdxl": {"latent_size": 128, "text_tokens": 77}}},
        "models": {"sdxl": {"params_b": 2.57, "user_layers": 70, "adapter_params_m": 131.0}},
        "rows": rows,
        "dpo": {"pairs": 4, "rows": 8, "step_s": 1.5, "pairs_per_s": 2.67, "peak_bytes": 30e9},
    }  # fmt: skip
    result = {"hardware": "H200", "versions": {}, "tiny": False, "targets": None, "sections": {"backbones": backbones}}
    result["settings"] = dict(config="stage_c", dtype="bfloat16", latent_size=24, image_size=1024, user_tokens=64)
    result["settings"].update(user_token_dim=768)
    judged = {t["target"]: t["met"] for t in suite.targets(result)}
    assert judged == {
        "personalized SDXL step <= 1.03x plain, batch 2": True,
        "personalized Flux step <= 1.03x plain, batch 8": False,
        "SDXL adapter-only DPO step of 4 pairs with checkpointing <= 24 GB": False,
    }
    table = suite.markdown(result)
    assert "| SDXL adapter-only DPO step of 4 pairs with checkpointing <= 24 GB | 30.00 GB | **not met** |" in table
    assert "SDXL 128 x 128 latents and 77 text tokens" in table
    assert "| Flux | 8 | eager | 2000.00 | 2000.00 (1.000x) | 2100.00 (1.050x) | - | 8.0 / - |" in table


def test_budget_and_skip_leave_sections_out_and_say_why(tmp_path):
    out = tmp_path / "suite.json"
    proc = _run("--tiny", "--budget", "0", "--skip", "step", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert sections["step"] == {"skipped": "--skip"}
    assert all(s["skipped"].startswith("time budget") for name, s in sections.items() if name != "step")
    assert "Not measured: `step`: --skip; `prior`: time budget" in out.with_suffix(".md").read_text()


def test_full_size_without_a_gpu_refuses_clearly(tmp_path):
    import torch

    proc = _run("--budget", "1", "--output", str(tmp_path / "suite.json"))
    if torch.cuda.is_available():  # a one-second budget starts no section
        assert proc.returncode == 0 and "time budget" in (tmp_path / "suite.md").read_text()
    else:
        assert proc.returncode != 0 and "use --tiny" in proc.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "benchmarks" / "results").glob("gpu_suite_*.json")))
def test_committed_gpu_tables_are_generated_from_their_json(name, suite, tmp_path):
    committed = ROOT / "benchmarks" / "results" / f"{name}.json"
    copy = tmp_path / committed.name
    copy.write_text(committed.read_text())
    assert Path(suite.render(str(copy))).read_text() == committed.with_suffix(".md").read_text()
    assert f'--8<-- "benchmarks/results/{name}.md"' in (ROOT / "docs" / "benchmarks.md").read_text()
