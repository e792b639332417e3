"""examples/generate.py and examples/interpolate_users.py on a tiny saved pipeline, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import safetensors.torch

from .conftest import random_users, randomize_
from .test_pipeline import build_pipe, stable_cascade_repos  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIZE = ["--height", "32", "--width", "32", "--steps", "3", "--decoder_steps", "2"]


@pytest.fixture(scope="module")
def saved_pipeline(stable_cascade_repos, tiny_clip_dir, tmp_path_factory) -> str:  # noqa: F811
    from ppd_diffusers import CLIPPreferenceEncoder

    pipe = build_pipe(stable_cascade_repos, CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir))
    randomize_(pipe.user_adapter)
    path = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(path)
    return str(path)


def write_pairs(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    items = []
    for i, (prompt, chosen, rejected) in enumerate(random_users(1, seed=seed)[0]):
        chosen.save(folder / f"{i}_chosen.png")
        rejected.save(folder / f"{i}_rejected.png")
        items.append({"prompt": prompt, "chosen": f"{i}_chosen.png", "rejected": f"{i}_rejected.png"})
    (folder / "pairs.json").write_text(json.dumps(items))
    return folder


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow  # a minute or more of CPU: CI runs it with `pytest -m slow`
def test_generate_writes_images_and_reusable_user_embeds(saved_pipeline, tmp_path):
    pairs = write_pairs(tmp_path / "alice", seed=1)
    out = tmp_path / "out"
    log = run(
        "generate.py", "--pipeline", saved_pipeline, "--pairs", str(pairs), "--prompt", "a red cat",
        "--prompt", "a blue dog", "--num_images", "2", "--output_dir", str(out), *SIZE,
    )  # fmt: skip
    assert "wrote" in log
    images = sorted(p.name for p in out.glob("*.png"))
    assert images == ["000_0.png", "000_1.png", "001_0.png", "001_1.png"]
    assert PIL.Image.open(out / "000_0.png").size == (32, 32)
    assert safetensors.torch.load_file(out / "user.safetensors")["user_embeds"].shape[0] == 1
    # the saved embedding reproduces the images without the encoder, from a pairs.json file as well
    again = tmp_path / "again"
    run(
        "generate.py", "--pipeline", saved_pipeline, "--user_embeds", str(out / "user.safetensors"),
        "--prompt", "a red cat", "--prompt", "a blue dog", "--num_images", "2", "--output_dir", str(again), *SIZE,
    )  # fmt: skip
    for name in images:
        assert np.array_equal(np.asarray(PIL.Image.open(out / name)), np.asarray(PIL.Image.open(again / name)))
    plain = tmp_path / "plain"
    run("generate.py", "--pipeline", saved_pipeline, "--prompt", "a red cat", "--output_dir", str(plain), *SIZE)
    personalized, base = (np.asarray(PIL.Image.open(folder / "000_0.png")) for folder in (out, plain))
    assert not np.array_equal(personalized, base)
    # --user_scale 0 switches the user off: the base model's image
    off = tmp_path / "off"
    run(
        "generate.py", "--pipeline", saved_pipeline, "--user_embeds", str(out / "user.safetensors"),
        "--user_scale", "0", "--prompt", "a red cat", "--output_dir", str(off), *SIZE,
    )  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(off / "000_0.png")), base)


def test_interpolate_users_writes_a_grid_from_user_a_to_user_b(saved_pipeline, tmp_path):
    alice, bob = write_pairs(tmp_path / "alice", seed=1), write_pairs(tmp_path / "bob", seed=2)
    grid_path = tmp_path / "grid.png"
    run(
        "interpolate_users.py", "--pipeline", saved_pipeline, "--pairs_a", str(alice),
        "--pairs_b", str(bob / "pairs.json"), "--prompt", "a red cat", "--prompt", "a blue dog",
        "--num_weights", "3", "--output", str(grid_path), *SIZE,
    )  # fmt: skip
    grid = np.asarray(PIL.Image.open(grid_path)).astype(int)
    assert grid.shape == (2 * 32, 3 * 32, 3)
    cells = [grid[:32, c * 32 : (c + 1) * 32] for c in range(3)]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(cells, cells[1:]))  # the user changes along the row
    for user, column in ((alice, 0), (bob, 2)):  # the ends are the two users themselves
        out = tmp_path / f"alone_{column}"
        run("generate.py", "--pipeline", saved_pipeline, "--pairs", str(user), "--prompt", "a red cat",
            "--output_dir", str(out), *SIZE)  # fmt: skip
        alone = np.asarray(PIL.Image.open(out / "000_0.png")).astype(int)
        assert np.abs(alone - cells[column]).max() <= 1  # batch of 3 vs 1: at most a rounding step


def test_contradictory_options_are_refused(saved_pipeline, tmp_path):
    cases = [
        (["--pipeline", saved_pipeline, "--user_guidance_scale", "6"], "--user_guidance_scale guides a user"),
        (["--pipeline", saved_pipeline, "--encoder", "x", "--pairs", "p"], "--encoder cannot be combined"),
        (["--pairs", "p"], "a user needs an adapter"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "generate.py"), "--prompt", "a cat", *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
