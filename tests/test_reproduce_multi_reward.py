"""`examples/reproduce_multi_reward.py`: the multi-reward experiment end to end on tiny offline models."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppd_diffusers.evaluation.multi_reward import MultiRewardConfig, pair_label, reproduce_multi_reward, share_of_bound
from ppd_diffusers.evaluation.scorer import parse_reward_model_paths

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ["clip_score", "aesthetic", "hps"]
PROMPTS, EVAL_PROMPTS, STEPS = 8, 2, 2


# ----------------------------------------------------------------------------------------------- pieces


def test_labels_follow_the_scores_and_equal_scores_tie():
    assert (pair_label(2.0, 1.0), pair_label(1.0, 2.0), pair_label(1.5, 1.5)) == (1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        pair_label(float("nan"), 1.0)


def test_share_of_bound_is_ppds_fraction_of_the_bounds_gain():
    # the paper's rows (Stable Cascade / PPD / single-reward bound): CLIP 31.97 / 32.66 / 32.96, HPS 23.87 / 27.51
    assert share_of_bound(31.97, 32.96, 32.66) == pytest.approx(100 * 0.69 / 0.99)
    assert share_of_bound(23.87, 28.61, 27.51) == pytest.approx(100 * 3.64 / 4.74)
    assert share_of_bound(1.0, 2.0, 2.0) == 100.0 and share_of_bound(1.0, 2.0, 1.0) == 0.0
    assert share_of_bound(1.0, 1.0, 3.0) is None  # no gain to share


def test_reward_model_paths_and_bad_settings_are_named():
    options = parse_reward_model_paths(["hps=/a", "aesthetic=/b", "aesthetic.clip_name_or_path=/c"])
    assert options == {"hps": {"name_or_path": "/a"}, "aesthetic": {"name_or_path": "/b", "clip_name_or_path": "/c"}}
    for bad in (["hps"], ["=x"], ["hps.=x"], ["hps=/a", "hps=/b"]):
        with pytest.raises(ValueError, match="reward_model_paths"):
            parse_reward_model_paths(bad)
    with pytest.raises(ValueError, match="`num_prompts` must be a positive integer"):
        MultiRewardConfig(num_prompts=0)
    with pytest.raises(ValueError, match="`rewards` must be distinct"):
        MultiRewardConfig(rewards=["hps", "hps"])
    with pytest.raises(ValueError, match="`rewards` must be distinct"):
        MultiRewardConfig(rewards=["pooled"])


def test_too_few_prompts_are_refused_before_any_model_loads(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na cat\n\na bird\n")  # 3 distinct prompts
    config = MultiRewardConfig(output_dir=str(tmp_path / "out"), prompts_file=str(tmp_path / "prompts.txt"),
                               num_prompts=2, num_eval_prompts=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"4 distinct prompts are needed, but .*prompts.txt has 3"):
        reproduce_multi_reward(config, scorers={"clip_score": None, "aesthetic": None, "hps": None})
    with pytest.raises(ValueError, match=r"`scorers` are \['hps'\] but `config.rewards` is"):
        reproduce_multi_reward(config, scorers={"hps": None})


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from ppd_diffusers.testing_utils import (
        save_random_clip,
        save_random_llava_onevision,
        save_tiny_aesthetic_predictor,
        save_tiny_hps,
        save_tiny_stable_cascade,
    )

    root = tmp_path_factory.mktemp("multi_reward_models")
    paths = {name: str(root / name) for name in ("prior", "decoder", "llava", "clip", "aesthetic", "hps")}
    save_tiny_stable_cascade(paths["prior"], paths["decoder"])
    save_random_llava_onevision(paths["llava"])
    save_random_clip(paths["clip"])
    save_tiny_aesthetic_predictor(paths["aesthetic"])
    save_tiny_hps(paths["hps"])
    return paths


def _reward_model_paths(models: dict[str, str]) -> list[str]:
    from ppd_diffusers.testing_utils import TINY_OPEN_CLIP_NAME

    # the tiny aesthetic folder holds both the head and the CLIP it reads; the tiny HPS is not ViT-H-14
    return [f"clip_score={models['clip']}", f"aesthetic={models['aesthetic']}",
            f"aesthetic.clip_name_or_path={models['aesthetic']}", f"hps={models['hps']}",
            f"hps.model_name={TINY_OPEN_CLIP_NAME}"]  # fmt: skip


def _cli(models: dict[str, str], output_dir: Path) -> list[str]:
    settings = dict(
        output_dir=output_dir, rewards=REWARDS, num_prompts=PROMPTS, num_eval_prompts=EVAL_PROMPTS, seed=0,
        generation_batch_size=16,
        reward_model_paths=_reward_model_paths(models),
        pretrained_model_name_or_path=models["prior"], decoder_model_name_or_path=models["decoder"],
        preference_encoder=models["llava"], encoder_layer=2, device="cpu",
        resolution=32, resolution_multiple=8, latent_dim_scale=2, num_inference_steps=2, decoder_num_inference_steps=2,
        max_train_steps=STEPS, train_batch_size=2, learning_rate=1e-3, lr_warmup_steps=0, beta_dpo=500,
        num_user_tokens=2, user_token_dim=16,
    )  # fmt: skip
    args = []
    for key, value in settings.items():
        args += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return args


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_recipe_runs_end_to_end_and_resumes(models, tmp_path, monkeypatch):
    import datasets

    from ppd_diffusers.evaluation.scorer import load_reward_scorers
    from ppd_diffusers.training import load_user_embeddings

    out = tmp_path / "out"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(sys, "argv", ["reproduce_multi_reward.py", *_cli(models, out)])
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import reproduce_multi_reward as example

    cpu = time.process_time()
    results = example.main()  # the command line: scorers built by name from --reward_model_paths
    print(f"the recipe took {time.process_time() - cpu:.1f} s of CPU")  # the target: <= 60 s

    # ---- the table: one row per reward, in order, each column the mean of its images' scores
    table, scores = results["table"], results["scores"]
    assert list(table) == REWARDS
    assert set(scores) == {"base", "pooled_dpo", *(f"{m}-{r}" for m in ("ppd", "bound") for r in REWARDS)}
    for reward, row in table.items():
        assert set(row) == {"base", "bound", "pooled_dpo", "ppd", "share_of_bound"}
        for column, image_set in (("base", "base"), ("bound", f"bound-{reward}"), ("pooled_dpo", "pooled_dpo"),
                                  ("ppd", f"ppd-{reward}")):  # fmt: skip
            values = scores[image_set][reward]
            assert len(values) == EVAL_PROMPTS and all(math.isfinite(v) for v in values)
            assert row[column] == pytest.approx(sum(values) / EVAL_PROMPTS)
        assert row["share_of_bound"] == pytest.approx(100 * (row["ppd"] - row["base"]) / (row["bound"] - row["base"]))
        assert results["ppd_cross_rewards"][reward][reward] == pytest.approx(row["ppd"])
    assert json.loads((out / "results.json").read_text())["table"] == table
    markdown = (out / "results.md").read_text()
    for reward, row in table.items():
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {reward} | "))
        assert f"| {row['base']:.4f} | {row['bound']:.4f} | {row['pooled_dpo']:.4f} | {row['ppd']:.4f} |" in line
        assert f"{row['share_of_bound']:.1f}%" in line
    assert (out / "results.png").stat().st_size > 0

    # ---- held-out prompts: none of them trained
    prompts = json.loads((out / "prompts.json").read_text())
    assert (
        len(prompts["train"]) == PROMPTS
        and len(prompts["eval"]) == EVAL_PROMPTS
        and not set(prompts["train"]) & set(prompts["eval"])
    )

    # ---- the labelled pairs: one row per (pair, reward); the labels are the scores' order, which re-scoring
    # the stored images with the real scorers reproduces
    pairs = datasets.load_from_disk(str(out / "pairs"))
    assert len(pairs) == PROMPTS * len(REWARDS) and pairs["user_id"] == [r for r in REWARDS for _ in range(PROMPTS)]
    assert pairs["caption"] == prompts["train"] * len(REWARDS)
    scorers = load_reward_scorers(REWARDS, parse_reward_model_paths(_reward_model_paths(models)), show_progress=False)
    for reward in REWARDS:
        rows = pairs.filter(lambda row, reward=reward: row["user_id"] == reward)
        assert rows["label_0"] == [pair_label(a, b) for a, b in zip(rows["score_0"], rows["score_1"], strict=True)]
        assert rows["label_1"] == [1 - label for label in rows["label_0"]]
        for column in ("0", "1"):
            rescored = scorers[reward](rows[f"jpg_{column}"], rows["caption"])
            torch.testing.assert_close(rescored, torch.tensor(rows[f"score_{column}"]), rtol=1e-4, atol=1e-5)
    pooled = datasets.load_from_disk(str(out / "pairs_pooled"))
    assert set(pooled["user_id"]) == {"pooled"} and pooled["label_0"] == pairs["label_0"]

    # ---- users: one embedding per reward from 4 of its own non-tied pairs; the baselines' users are constant
    embeddings, draws, _ = load_user_embeddings(out / "user_embeddings" / "user_embeddings.safetensors")
    assert sorted(d.user_id for d in draws) == sorted(REWARDS)
    for draw in draws:
        assert len(draw.rows) == 4
        assert all(pairs[r]["user_id"] == draw.user_id and pairs[r]["label_0"] != 0.5 for r in draw.rows)
    constant, constant_draws, _ = load_user_embeddings(out / "user_embeddings" / "constant_all_users.safetensors")
    assert constant_draws == draws and not constant.any() and embeddings.abs().sum() > 0

    # ---- the budget: every run the same steps of the same pairs per step; pooled DPO on exactly PPD's pairs
    assert results["budget"] == {"steps": STEPS, "pairs_per_step": 2}
    stats = results["training_pairs"]
    assert stats["pooled_dpo"] == stats["ppd"]
    assert sum(stats[f"bound-{r}"]["pairs"] for r in REWARDS) == stats["ppd"]["pairs"]
    for name in stats:
        run = json.loads((out / "models" / name / "run.json").read_text())
        assert run["steps"] == STEPS and (out / "models" / name / "diffusion_pytorch_model.safetensors").exists()

    # ---- resume: a second call redoes nothing and gives the same table
    before = _mtimes(out)
    config = MultiRewardConfig(**results["config"])
    again = reproduce_multi_reward(config, scorers)
    assert again["table"] == table and again["scores"] == scores
    after = _mtimes(out)
    redone = {p for p in after if after[p] != before.get(p)}
    assert redone == {"results.json", "results.md", "results.png"}
    # an image set lost after a kill is made again from the same seeds: the same scores
    for path in (out / "eval" / "images" / "ppd-hps").iterdir():
        path.unlink()
    (out / "eval" / "scores" / "ppd-hps.json").unlink()
    assert reproduce_multi_reward(config, scorers)["scores"] == scores
    # a resume with settings that change the results is refused, naming them
    with pytest.raises(ValueError, match=r"max_train_steps: 2 then, 5 now"):
        reproduce_multi_reward(MultiRewardConfig(**{**results["config"], "max_train_steps": 5}), scorers)
    remade = {p for p, mtime in _mtimes(out).items() if mtime != before.get(p)}
    assert {p for p in remade if not p.startswith("results.")} == {
        *(f"eval/images/ppd-hps/{i:06d}.png" for i in range(EVAL_PROMPTS)),
        "eval/scores/ppd-hps.json",
    }
    # a training run killed after its last checkpoint resumes from it, to the same weights
    bound = out / "models" / "bound-hps"
    weights = load_file(bound / "diffusion_pytorch_model.safetensors")
    (bound / "diffusion_pytorch_model.safetensors").unlink()
    (bound / "run.json").unlink()
    assert reproduce_multi_reward(config, scorers)["table"] == table
    resumed = load_file(bound / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
