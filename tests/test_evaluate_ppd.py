"""The win-rate protocol (``ppd_diffusers.evaluation``: users, records, report) and ``examples/evaluate_ppd.py``
on a tiny saved pipeline, tiny real scorers and a toy Pick-a-Pic dataset, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ppd_diffusers.evaluation.records import RecordStore, check_settings, record_key
from ppd_diffusers.evaluation.report import summarize_records
from ppd_diffusers.evaluation.users import plan_evaluation_users

from .test_generation_examples import saved_pipeline  # noqa: F401  (fixture)
from .test_pipeline import stable_cascade_repos  # noqa: F401  (fixture)
from .toy_pickapic import toy_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIZE = ["--height", "32", "--width", "32", "--steps", "2", "--decoder_steps", "2"]


def _columns(captions, users, labels):
    return {"caption": captions, "user_id": users, "label_0": labels}


def test_profile_captions_never_become_prompts_or_held_out_choices():
    # user 7: the Pick-a-Pic pattern, one prompt over consecutive rows; ties are no pairs
    captions = ["A cat", "a cat ", "a  CAT", "a dog", "a dog", "a fish", "a bird", "a tie", "a cow", "a hen"]
    labels = [1, 0, 1, 1, 0, 1, 0, 0.5, 1, 1]
    users = [7] * 8 + [8] * 2
    (user,) = plan_evaluation_users(_columns(captions, users, labels), users=[7], num_profile_pairs=2, seed=3)
    profile = {" ".join(captions[r].split()).casefold() for r in user.profile_rows}
    assert len(user.profile_rows) == 2 and set(user.profile_rows) <= {0, 1, 2, 3, 4, 5, 6}
    assert all(" ".join(captions[r].split()).casefold() not in profile for r in user.held_out_rows)
    assert all(users[r] == 7 and labels[r] != 0.5 for r in user.held_out_rows)
    assert {p.casefold() for p in user.prompts}.isdisjoint(profile)
    assert len(set(map(str.casefold, user.prompts))) == len(user.prompts)  # each caption once
    expected = [c for c in ("a cat", "a dog", "a fish", "a bird") if c not in profile]
    assert [p.casefold() for p in user.prompts] == expected
    # the judge learns from one pair per caption: consecutive rows of a caption repeat one choice
    assert [captions[r].casefold() for r in user.judge_rows] == expected
    # the same seed gives the same profile as the training draw
    (again,) = plan_evaluation_users(_columns(captions, users, labels), users=[7], num_profile_pairs=2, seed=3)
    assert again == user


def test_a_held_out_choice_sharing_an_image_with_the_profile_is_left_out():
    columns = _columns(["a cat", "a dog", "a fish", "a bird"], ["u"] * 4, [1, 1, 0, 1])
    columns |= {"image_0_uid": ["w", "x", "y", "z"], "image_1_uid": ["l0", "l1", "w", "l3"]}  # row 2 shows row 0's w
    (user,) = plan_evaluation_users(columns, profiles={"u": (0,)}, num_profile_pairs=1)
    assert (user.profile_rows, user.held_out_rows, user.prompts) == ((0,), (1, 3), ("a dog", "a bird"))


def test_plan_limits_and_errors():
    rows = toy_rows(users=3, pairs=6, ties=1, corrupt=False)
    columns = _columns(rows["caption"], rows["user_id"], rows["label_0"])
    everyone = plan_evaluation_users(columns, num_profile_pairs=4)
    assert [u.user_id for u in everyone] == ["user0", "user1", "user2"]
    assert all(len(u.prompts) == 2 and len(u.held_out_rows) == 2 for u in everyone)
    limited = plan_evaluation_users(columns, ["user2", "user0"], num_profile_pairs=4, max_prompts=1, max_users=1)
    assert [(u.user_id, len(u.prompts)) for u in limited] == [("user2", 1)]
    with pytest.raises(ValueError, match="User 'user9' has 0 non-tied pairs"):
        plan_evaluation_users(columns, ["user9"])
    with pytest.raises(ValueError, match="User 'user1' has 6 non-tied pairs in the dataset, fewer than the 7"):
        plan_evaluation_users(columns, ["user1"], num_profile_pairs=7)
    with pytest.raises(ValueError, match="max_prompts"):
        plan_evaluation_users(columns, max_prompts=0)
    with pytest.raises(ValueError, match=r"user 'user1' lists dataset row 0, which belongs to user 'user0'"):
        plan_evaluation_users(columns, ["user1"], profiles={"user1": (0, 7, 8, 9)})


def test_numpy_user_ids_plan_as_plain_ints():
    columns = _columns(["a", "b", "c", "d"], list(np.array([3, 3, 3, 3])), [1, 0, 1, 1])
    (user,) = plan_evaluation_users(columns, users=[np.int64(3)], num_profile_pairs=2)
    assert type(user.user_id) is int and record_key(user.user_id, 0) == record_key(3, 0)


def test_records_survive_a_killed_write_and_keep_user_id_types(tmp_path):
    store = RecordStore(tmp_path, process_index=1)
    store.append({"user_id": 5, "prompt_index": 0, "x": 1})
    store.append({"user_id": "5", "prompt_index": 0, "x": 2})
    with open(store.path, "a") as file:
        file.write('{"user_id": 5, "prompt_')  # killed mid-line
    RecordStore(tmp_path, process_index=0).append({"user_id": 6, "prompt_index": 1, "x": 3})
    store.append({"user_id": 5, "prompt_index": 1, "x": 4})  # starts on a fresh line
    records = RecordStore(tmp_path).load()
    assert sorted(records) == sorted([record_key(5, 0), record_key("5", 0), record_key(6, 1), record_key(5, 1)])
    assert records[record_key(5, 0)]["x"] == 1 and records[record_key("5", 0)]["x"] == 2


def test_a_resumed_evaluation_with_other_settings_is_refused(tmp_path):
    check_settings(tmp_path, {"adapter": "a", "seed": 0, "users": [1]}, may_change=("users",))
    check_settings(tmp_path, {"adapter": "a", "seed": 0, "users": [1, 2]}, may_change=("users",))
    with pytest.raises(ValueError, match=r"adapter: 'a' then, 'b' now; seed: 0 then, 1 now"):
        check_settings(tmp_path, {"adapter": "b", "seed": 1, "users": [1]}, may_change=("users",))


def _record(user, index, base, mine, judge, accuracy=0.75):
    return {"user_id": user, "prompt_index": index, "scores": {"r": {"base": base, "personalized": mine}},
            "judges": {"j": judge, "vlm": 0.5},
            "judge_details": {"j": {"scorer": "r", "accuracy": accuracy, "pairs": 4},
                              "vlm": {"p_first_ab": 0.75, "p_first_ba": 0.25 + index / 10}}}  # fmt: skip


def test_win_rates_weigh_users_equally_and_count_ties_half():
    records = [
        _record(1, 0, 0.0, 1.0, 0.9), _record(1, 1, 1.0, 1.0, 0.5), _record(1, 2, 2.0, 1.0, 0.2),  # r: 1, .5, 0
        _record(2, 0, 0.0, 3.0, 0.7, accuracy=0.5),  # r: 1
    ]  # fmt: skip
    summary = summarize_records(records)
    reward, judge = summary["win_rates"]["reward/r"], summary["win_rates"]["judge/j"]
    assert reward["per_user"] == {"1": 0.5, "2": 1.0}
    assert reward["mean"] == pytest.approx(0.75) and reward["image_level"] == pytest.approx(2.5 / 4)
    assert judge["per_user"] == {"1": 0.5, "2": 1.0}  # 0.9 > .5 wins, 0.5 ties, 0.2 loses
    assert summary["rewards"]["r"]["difference"] == pytest.approx(((1 + 0 - 1) / 3 + 3) / 2)
    assert summary["rewards"]["r"]["base"] == pytest.approx(0.75)
    assert summary["judges"]["j"]["mean_probability"] == pytest.approx(0.575)
    j = summary["judges"]["j"]
    assert (j["users"], j["users_above_chance"], j["scorers_chosen"]) == (2, 1, {"r": 2})
    assert summary["win_rates"]["judge/j (users it fits above chance)"]["per_user"] == {"1": 0.5}  # user 2: 0.5
    # position bias: the mean of P(first) over both orders, (0.75 + 0.25 + i / 10) / 2 for prompt i
    assert summary["judges"]["vlm"]["position_bias"] == pytest.approx(np.mean([0.5, 0.55, 0.6, 0.5]))
    low, high = reward["ci95"]
    assert 0.5 <= low <= reward["mean"] <= high <= 1.0
    assert (summary["users"], summary["prompts"]) == (2, 4)


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> str:
    import datasets

    path = tmp_path_factory.mktemp("toy-pickapic")
    rows = toy_rows(users=3, pairs=6, ties=1, corrupt=False)
    datasets.Dataset.from_dict({k: rows[k] for k in ("caption", "jpg_0", "jpg_1", "label_0", "user_id")}).save_to_disk(
        path
    )
    return str(path)


def _evaluate(saved_pipeline, toy_dataset, tiny_clip_dir, out, *extra, launcher=(sys.executable,), env=None):  # noqa: F811
    return subprocess.run(
        [*launcher, str(EXAMPLES / "evaluate_ppd.py"), "--pipeline", saved_pipeline, "--dataset_name",
         toy_dataset, "--all_users_are_held_out", "--scorers", "clip_score", "--reward_model_paths",
         f"clip_score={tiny_clip_dir}", "--held_out_pairs_judge", "--output_dir", str(out), *SIZE, *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )  # fmt: skip


GENERATION = dict(height=32, width=32, num_inference_steps=2, decoder_num_inference_steps=2)


def test_base_images_are_the_base_model_scores_are_the_scorers_and_a_cut_run_resumes(
    saved_pipeline,  # noqa: F811
    toy_dataset,
    tiny_clip_dir,
    tiny_llava_dir,
    tmp_path,
):
    from ppd_diffusers import PersonalizedStableCascadePipeline
    from ppd_diffusers.evaluation import build_judges, evaluate_personalization, load_scorer, write_evaluation_report
    from ppd_diffusers.training import load_pickapic_dataset

    pipe = PersonalizedStableCascadePipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_pickapic_dataset(toy_dataset)
    users = plan_evaluation_users(dataset, max_prompts=1, max_users=2)
    scorers = {"clip_score": load_scorer("clip_score", tiny_clip_dir, show_progress=False)}
    judges = build_judges(scorers, tiny_llava_dir)
    assert list(judges) == ["held_out_pairs", "vlm"]
    out = tmp_path / "eval"
    records = evaluate_personalization(pipe, dataset, users, out, scorers, judges, show_progress=False, **GENERATION)
    assert [(r["user_id"], r["prompt_index"]) for r in records] == [("user0", 0), ("user1", 0)]
    record = records[1]
    # the base image is the plain base model from the recorded seed; the personalized one differs
    plain = pipe(record["prompt"], generator=torch.Generator().manual_seed(record["seed"]), **GENERATION).images[0]
    base, mine = (PIL.Image.open(out / record["images"][v]) for v in ("base", "personalized"))
    assert np.array_equal(np.asarray(plain), np.asarray(base))
    assert not np.array_equal(np.asarray(base), np.asarray(mine))
    # the recorded score is the scorer's score of the saved image; the held-out judge says 0, 0.5 or 1
    rescored = scorers["clip_score"]([base], [record["prompt"]]).item()
    assert record["scores"]["clip_score"]["base"] == pytest.approx(rescored, abs=1e-4)
    assert record["judges"]["held_out_pairs"] in (0.0, 0.5, 1.0)
    assert set(record["judge_details"]["held_out_pairs"]) == {"scorer", "accuracy", "pairs"}
    vlm = record["judge_details"]["vlm"]  # the verdict combines both orders, whose P(first) is recorded
    assert record["judges"]["vlm"] == pytest.approx((vlm["p_first_ab"] + 1 - vlm["p_first_ba"]) / 2, abs=1e-6)

    summary = write_evaluation_report(records, out, {"adapter": "tiny"})
    metrics = {"reward/clip_score", "judge/held_out_pairs", "judge/vlm"}
    assert metrics <= set(summary["win_rates"]) <= metrics | {"judge/held_out_pairs (users it fits above chance)"}
    for name in ("report.json", "report.md", "win_rates.png", "rewards.png", "grids/user-user0.png"):
        assert (out / name).stat().st_size > 0, name
    assert "![Win rates](win_rates.png)" in (out / "report.md").read_text()

    # killed while writing the second record: a rerun redoes that one only, and reproduces it exactly
    path = out / "records" / "process-0.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:30])
    again = evaluate_personalization(pipe, dataset, users, out, scorers, judges, show_progress=False, **GENERATION)
    assert sorted(again, key=lambda r: r["user_id"]) == records
    assert len(path.read_text().splitlines()) == 3  # the first record kept, the cut line and its redo
    # a smaller plan reports its own users only; the other records stay on disk
    fewer = evaluate_personalization(pipe, dataset, users[:1], out, scorers, judges, show_progress=False)
    assert fewer == records[:1] and len(RecordStore(out).load()) == 2


@pytest.mark.slow
def test_evaluate_ppd_script_extends_a_run_and_refuses_other_settings(
    saved_pipeline,  # noqa: F811
    toy_dataset,
    tiny_clip_dir,
    tmp_path,
):
    out = tmp_path / "eval"
    first = _evaluate(saved_pipeline, toy_dataset, tiny_clip_dir, out, "--max_prompts", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["users"] == ["user0", "user1", "user2"] and report["prompts"] == 3
    second = _evaluate(saved_pipeline, toy_dataset, tiny_clip_dir, out, "--max_prompts", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 users, 3 prompts to evaluate (3 done before)" in second.stderr
    assert json.loads((out / "report.json").read_text())["prompts"] == 6
    changed = _evaluate(saved_pipeline, toy_dataset, tiny_clip_dir, out, "--seed", "1")
    assert changed.returncode != 0 and "seed: 0 then, 1 now" in changed.stderr


@pytest.mark.slow
def test_two_processes_evaluate_the_same_records_as_one(
    saved_pipeline,  # noqa: F811
    toy_dataset,
    tiny_clip_dir,
    tmp_path,
):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _evaluate(saved_pipeline, toy_dataset, tiny_clip_dir, one, "--max_prompts", "1").returncode == 0
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    # ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets; with --multi_gpu it gives 2 CPU processes (gloo)
    result = _evaluate(saved_pipeline, toy_dataset, tiny_clip_dir, two, "--max_prompts", "1", launcher=launcher,
                       env={"ACCELERATE_USE_CPU": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (two / "records").glob("*.jsonl")) == ["process-0.jsonl", "process-1.jsonl"]
    assert RecordStore(one).load() == RecordStore(two).load()
