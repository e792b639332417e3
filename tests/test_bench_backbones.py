"""``benchmarks/bench_backbones.py``: each timed variant runs what its name says, the SDXL DPO step trains the
adapter through the checkpointed UNet, the ``--tiny`` command writes its JSON and table, and the targets are judged
as stated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_backbones.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_backbones

    yield bench_backbones
    sys.path.remove(str(SCRIPT.parent))


def _tiny_args(bench, *extra: str):
    return bench.parse_args(["--tiny", *extra])


def _small_setting(backbone: str) -> dict:
    """The unit tests' tiny models (smaller than the benchmark's ``TINY``), for speed."""
    from ppd_diffusers.testing_utils import tiny_flux_transformer_config, tiny_sdxl_unet_config

    config = tiny_sdxl_unet_config() if backbone == "sdxl" else tiny_flux_transformer_config()
    return dict(config=config, latent_size=8, text_tokens=6)


@pytest.mark.parametrize("backbone", ["sdxl", "flux"])
def test_step_variants_run_the_plain_model_the_attached_model_and_the_user(bench, backbone):
    args = _tiny_args(bench)
    setting = _small_setting(backbone)
    model = bench.build_model(backbone, setting, "cpu", torch.float32)
    model_p = bench.build_adapter(model, args, torch.float32).attach(model)
    fns, setups = bench.step_functions(backbone, model_p, setting, args, batch=4)
    expected = {"plain", "attached_no_user", "user"} | ({"user_guidance_layout"} if backbone == "sdxl" else set())
    assert set(fns) == set(setups) == expected
    out = {}
    with torch.no_grad():
        for name, fn in fns.items():
            setups[name]()
            out[name] = fn().sample.clone()
    # the plain step ran diffusers' own processors; attached without a user is the same model bit for bit
    assert torch.equal(out["attached_no_user"], out["plain"])
    assert not torch.allclose(out["user"], out["plain"], atol=1e-4)  # V' is non-zero: the user changes every row
    assert all(not torch.allclose(out["user"][i], out["plain"][i], atol=1e-4) for i in range(4))
    if backbone == "sdxl":
        # [negative, positive]: the negative half is the plain model's, the positive half has the same users as
        # the user-on-every-row step
        guided = out["user_guidance_layout"]
        assert torch.equal(guided[:2], out["plain"][:2])
        torch.testing.assert_close(guided[2:], out["user"][2:], atol=1e-5, rtol=1e-5)
    model_p.detach()


def test_sdxl_dpo_step_trains_every_user_projection_through_the_checkpointed_unet(bench):
    args = _tiny_args(bench, "--dpo-pairs", "2")
    setting = _small_setting("sdxl")
    unet = bench.build_model("sdxl", setting, "cpu", torch.float32)
    adapter = bench.build_adapter(unet, args, torch.float32)
    model = adapter.attach(unet).train()
    unet.enable_gradient_checkpointing()
    grads = {}
    for name, param in adapter.named_parameters():  # recorded before AdamW consumes and zero_grad drops them
        param.register_hook(lambda grad, name=name: grads.__setitem__(name, grad.abs().sum().item()))
    before = {name: p.detach().clone() for name, p in adapter.named_parameters()}
    bench.sdxl_dpo_step(model, setting, args)()
    assert set(grads) == set(before) and all(g > 0 for g in grads.values()), grads
    assert all(not torch.equal(before[name], p) for name, p in adapter.named_parameters())
    assert not any(p.requires_grad for p in unet.parameters())


def test_tiny_command_writes_the_json_and_the_table_generated_from_it(bench, tmp_path):
    out = tmp_path / "backbones.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--rounds", "1", "--warmup", "0", "--batch-sizes", "2"]
    cmd += ["--dpo-pairs", "1", "--dpo-rounds", "1", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["tiny"] and set(result["versions"]) == set(bench.PACKAGES)
    assert [(r["backbone"], r["batch"]) for r in result["rows"]] == [("sdxl", 2), ("flux", 2)]
    sdxl, flux = result["rows"]
    assert "ratio_user_guidance_layout" in sdxl and "ratio_user_guidance_layout" not in flux
    assert all(r[k] > 0 for r in result["rows"] for k in r if k.startswith("ratio_"))
    assert all(r["peak_bytes"] is None for r in result["rows"])  # no GPU peak on the CPU
    assert result["models"]["sdxl"]["user_layers"] == 8 and result["models"]["flux"]["user_layers"] == 2
    dpo = result["dpo"]
    assert dpo["pairs"] == 1 and dpo["rows"] == 2 and dpo["step_s"] > 0 and dpo["peak_bytes"] is None
    table = out.with_suffix(".md").read_text()
    assert table == bench.markdown(result) + "\n"
    assert table.count("not judged (tiny CPU run)") == 3 and "| Flux | 2 |" in table


def _row(backbone: str, batch: int, ratio: float) -> dict:
    row = {"backbone": backbone, "batch": batch, "plain_ms": 100.0, "user_ms": 100 * ratio, "ratio_user": ratio}
    row.update(attached_no_user_ms=100.5, ratio_attached_no_user=1.005, peak_bytes={"plain": 2**31, "user": 2**32})
    return row


def test_targets_are_judged_against_1_03x_and_24_gb(bench):
    rows = [_row("sdxl", 2, 1.02), _row("flux", 8, 1.05)]
    dpo = {"pairs": 4, "rows": 8, "step_s": 2.0, "pairs_per_s": 2.0, "peak_bytes": 15e9}
    targets = bench.targets({"rows": rows, "dpo": dpo})
    assert [t["met"] for t in targets] == [True, False, True]
    assert targets[0]["measured"] == "1.020x (adapter attached, no user: 1.005x)"
    assert targets[2]["measured"] == "15.00 GB"
    assert bench.targets({"dpo": dict(dpo, peak_bytes=25e9)})[0]["met"] is False
    assert bench.targets({"dpo": {"pairs": 4, "rows": 8, "oom": True, "peak_bytes": None}})[0] == {
        "target": "SDXL adapter-only DPO step of 4 pairs with checkpointing <= 24 GB",
        "measured": "out of memory",
        "met": False,
    }
    assert bench.targets({"dpo": dict(dpo, peak_bytes=None)})[0]["met"] is None  # the CPU measures no peak
    table = "\n".join(bench.tables({"rows": rows, "dpo": dpo}))
    assert "| SDXL | 2 | eager | 100.00 | 100.50 (1.005x) | 102.00 (1.020x) | - | 2.0 / 4.0 |" in table
    assert "| 4 (8) | 2.000 | 2.00 | 15.00 |" in table


def test_cuda_graph_rows_are_judged_and_shown_beside_the_eager_ones(bench):
    graph = dict(_row("sdxl", 2, 1.025), launch="cuda_graph", peak_bytes=None)
    rows = [dict(_row("sdxl", 2, 1.2), launch="eager"), graph]
    targets = bench.targets({"rows": rows})
    assert [(t["target"], t["met"]) for t in targets] == [
        ("personalized SDXL step <= 1.03x plain, batch 2", False),
        ("personalized SDXL step <= 1.03x plain, batch 2 (CUDA graph replay)", True),
    ]
    table = bench.tables({"rows": rows})
    assert table[3] == "| SDXL | 2 | CUDA graph | 100.00 | 100.50 (1.005x) | 102.50 (1.025x) | - | - / - |"


def test_bad_arguments_are_refused(bench, capsys):
    for argv in (["--rounds", "0"], ["--batch-sizes", "2", "0"], ["--backbones", "stage_c"], ["--cuda-graphs"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--tiny", *argv])
    err = capsys.readouterr().err
    assert "--rounds must be positive" in err and "--cuda-graphs needs a GPU" in err


def test_full_size_without_a_gpu_refuses_clearly(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="use --tiny"):
        bench.main([])
