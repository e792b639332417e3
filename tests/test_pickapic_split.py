"""Leaking rows (same prompt or image as a user's profile pairs) and the user-level held-out split."""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ppd_diffusers.training import (
    HeldOutSplit,
    LeakageIndex,
    PPDTrainingArguments,
    PreferencePairsDataset,
    UserDraw,
    adapter_model_card,
    load_held_out_split,
    make_held_out_split,
    sample_user_draws,
)
from ppd_diffusers.training.held_out import HELD_OUT_FILE, choose_held_out_users
from ppd_diffusers.training.pickapic import normalize_caption

from .toy_pickapic import toy_rows

# (user_id, caption, image_0_uid, image_1_uid, label_0): user 7 picked W for "a red fox" over three other
# images, one row each (Pick-a-Pic's repeated winner); user 8 wrote the same prompt too
ROWS = [
    (7, "a red fox", "W", "L1", 1.0),  # 0: in user 7's draw
    (7, "a red fox", "L2", "W", 0.0),  # 1: same prompt, same winner
    (7, " A  RED fox", "W", "L3", 1.0),  # 2: the same prompt up to spaces and case
    (7, "a blue whale", "L1", "X", 1.0),  # 3: another prompt, but row 0's losing image
    (7, "a green frog", "Y", "Z", 0.0),  # 4: unrelated: trains
    (7, "mountains", "M1", "M2", 1.0),  # 5: in user 7's draw
    (7, "mountains at night", "M3", "M4", 1.0),  # 6: another prompt: trains
    (7, "a red fox", "W", "L4", 0.5),  # 7: a tie
    (8, "a red fox", "W8", "L8", 1.0),  # 8: user 7's prompt, but user 8's row: trains
    (8, "a house", "H1", "H2", 0.0),  # 9: in user 8's draw
    (8, "a tree", "T1", "T2", 1.0),  # 10
    (8, "a boat", "B1", "B2", 0.0),  # 11
]
DRAWS = [UserDraw(7, 0, (0, 5)), UserDraw(8, 0, (9,))]


def _dataset(rows=ROWS, uids: bool = True) -> datasets.Dataset:
    columns = dict(zip(("user_id", "caption", "image_0_uid", "image_1_uid", "label_0"), zip(*rows), strict=True))
    columns = {name: list(values) for name, values in columns.items()}
    if not uids:
        del columns["image_0_uid"], columns["image_1_uid"]
    # latents tagged with the row index, so an example shows which row it is
    columns["latents_0"] = [np.full((1, 2, 2), row, np.float32) for row in range(len(rows))]
    columns["latents_1"] = [np.full((1, 2, 2), -row, np.float32) for row in range(len(rows))]
    return datasets.Dataset.from_dict(columns)


def _embeddings(count: int) -> torch.Tensor:
    return torch.arange(count, dtype=torch.float32).view(count, 1, 1).expand(count, 1, 4).clone()


# ------------------------------------------------------------------------------------------------ leakage


def test_rows_sharing_a_prompt_or_an_image_with_the_profile_never_train():
    pairs = PreferencePairsDataset(_dataset(), _embeddings(2), DRAWS)
    assert sorted(pairs.rows.tolist()) == [4, 6, 8, 10, 11]
    stats = pairs.stats
    assert (stats.rows, stats.ties, stats.profile_rows, stats.leaking_rows) == (12, 1, 3, 3)
    assert (stats.pairs, stats.users, stats.compared_image_uids) == (5, 2, True)
    example = pairs[int(np.flatnonzero(pairs.rows == 4)[0])]
    # label 0: image 1 preferred; user 7's own embedding (draw 0)
    assert example["row"] == 4 and example["latents_chosen"].mean() == -4 and example["user_embeds"][0, 0] == 0


def test_without_image_uids_rows_are_compared_by_caption_only():
    pairs = PreferencePairsDataset(_dataset(uids=False), _embeddings(2), DRAWS)
    # row 3 shares only an image with the profile: without uids nothing tells, and it trains
    assert sorted(pairs.rows.tolist()) == [3, 4, 6, 8, 10, 11]
    assert (pairs.stats.leaking_rows, pairs.stats.compared_image_uids) == (2, False)


def test_with_several_draws_a_row_joins_a_draw_it_does_not_leak_from():
    rows = [
        (1, "fox", "A", "B", 1.0),  # 0: draw 0
        (1, "Fox", "C", "D", 1.0),  # 1: leaks from draw 0 (prompt)
        (1, "cat", "E", "F", 1.0),  # 2: leaks from neither
        (1, "owl", "G", "H", 1.0),  # 3: draw 1
        (1, "bat", "I", "G", 1.0),  # 4: leaks from draw 1 (image G)
        (1, "fox", "J", "G", 1.0),  # 5: leaks from both
    ]
    draws = [UserDraw(1, 0, (0,)), UserDraw(1, 1, (3,))]
    pairs = PreferencePairsDataset(_dataset(rows), _embeddings(2), draws)
    joined = {int(r): int(e) for r, e in zip(pairs.rows, pairs.embedding_of_row, strict=True)}
    assert {r: e for r, e in joined.items() if r != 2} == {0: 1, 1: 1, 3: 0, 4: 0}
    assert joined[2] in (0, 1)
    assert (pairs.stats.profile_rows, pairs.stats.leaking_rows, pairs.stats.pairs) == (0, 1, 5)


def test_leakage_index_compares_normalised_captions_and_ignores_missing_uids():
    rows = {
        "caption": ["Sunset\tover  the SEA", "sunset over the sea", "a", "b", "c"],
        "image_0_uid": ["s1", "s2", None, "", "q"],
        "image_1_uid": [None, "s3", "x", "y", None],
    }
    index = LeakageIndex(rows)
    assert index.uses_image_uids and len(index) == 5
    assert index.row_keys(0) == ("sunset over the sea", frozenset({"s1"}))
    draw = UserDraw("u", 0, (2, 3))
    # a missing uid (None or "") matches nothing, not even another missing one
    assert [index.leaks(row, draw) for row in range(5)] == [False, False, True, True, False]
    assert [index.leaks(row, UserDraw("u", 1, (0,))) for row in range(5)] == [True, True, False, False, False]
    assert normalize_caption(None) == "" and normalize_caption(" Ünïcode  CAFÉ ") == "ünïcode café"


def test_the_plan_reads_no_image():
    # image columns of bytes that are not images: planning (and leakage) never decodes them
    data = _dataset().add_column("jpg_0", [b"no image"] * len(ROWS)).add_column("jpg_1", [b"nope"] * len(ROWS))
    pairs = PreferencePairsDataset(data.remove_columns(["latents_0", "latents_1"]), _embeddings(2), DRAWS,
                                   image_transform=lambda image: image)  # fmt: skip
    assert pairs.stats.pairs == 5


# ------------------------------------------------------------------------------------------ held-out users


@given(
    users=st.sets(st.one_of(st.integers(-1000, 10**12), st.text(max_size=6)), max_size=60),
    validation=st.integers(0, 8),
    fraction=st.floats(0, 0.99),
    cap=st.one_of(st.none(), st.integers(0, 10)),
    seed=st.integers(0, 3),
)
def test_held_out_users_are_disjoint_counted_and_independent_of_order(users, validation, fraction, cap, seed):
    evaluation, chosen = choose_held_out_users(users, validation, fraction, cap, seed)
    expected = int(fraction * len(users) + 1e-9) if cap is None else min(int(fraction * len(users) + 1e-9), cap)
    assert len(evaluation) == expected and len(chosen) == min(validation, len(users) - expected)
    assert not set(evaluation) & set(chosen) and set(evaluation) | set(chosen) <= users
    shuffled = list(users)
    random.Random(seed).shuffle(shuffled)
    assert choose_held_out_users(shuffled * 2, validation, fraction, cap, seed) == (evaluation, chosen)
    # the evaluation users do not move with the number of validation users
    assert choose_held_out_users(users, validation + 3, fraction, cap, seed)[0] == evaluation


def test_held_out_split_arguments_are_checked():
    with pytest.raises(ValueError, match="`eval_user_fraction` must be in"):
        choose_held_out_users([1, 2], eval_user_fraction=1.0)
    with pytest.raises(ValueError, match="must not be negative"):
        choose_held_out_users([1, 2], num_validation_users=-1)
    with pytest.raises(ValueError, match="User ids must be integers or strings"):
        choose_held_out_users([1.5])
    with pytest.raises(ValueError, match="`eval_user_fraction` must be in"):
        PPDTrainingArguments(dataset_name="d", user_embeddings="u", eval_user_fraction=-0.1)
    with pytest.raises(ValueError, match="`max_eval_users` must not be negative"):
        PPDTrainingArguments(dataset_name="d", user_embeddings="u", max_eval_users=-1)


def _toy(order_seed: int | None = None) -> datasets.Dataset:
    rows = toy_rows(users=20, pairs=5, ties=1, corrupt=False, image_size=2)
    rows.pop("jpg_0"), rows.pop("jpg_1")
    rows["user_id"] = [1000 + int(u.removeprefix("user")) for u in rows["user_id"]]  # Pick-a-Pic's ids are ints
    if order_seed is not None:
        order = np.random.default_rng(order_seed).permutation(len(rows["user_id"]))
        rows = {name: [values[i] for i in order] for name, values in rows.items()}
    return datasets.Dataset.from_dict(rows)


def test_the_split_is_written_loads_back_and_no_training_pair_is_held_out(tmp_path):
    dataset = _toy()
    draws, _ = sample_user_draws(dataset, num_pairs=4)
    provenance = dict(dataset_name="toy", dataset_split="train", user_embeddings="u.safetensors")
    split = make_held_out_split(
        dataset, draws, num_validation_users=3, eval_user_fraction=0.2, max_eval_users=None, seed=5, **provenance
    )
    assert (len(split.evaluation_users), len(split.validation_users), split.candidate_users) == (4, 3, 20)
    assert split.rows == {u: 5 for u in split.users}  # 5 non-tied rows each; the tie is not counted
    path = split.save(tmp_path)
    assert path == str(tmp_path / HELD_OUT_FILE)
    record = json.loads((tmp_path / HELD_OUT_FILE).read_text())
    assert record["evaluation_users"][0] == {"user_id": split.evaluation_users[0], "rows": 5}
    loaded = load_held_out_split(tmp_path)
    assert loaded == split and load_held_out_split(path) == split
    assert all(type(u) is int for u in loaded.users)  # JSON keeps ints ints
    assert (loaded.seed, loaded.dataset, loaded.dataset_split, loaded.eval_user_fraction) == (5, "toy", "train", 0.2)

    pairs = PreferencePairsDataset(dataset, _embeddings(len(draws)), draws, exclude_users=loaded.users)
    trained = set(pairs.users_of(range(len(pairs))))
    assert trained and not trained & set(loaded.users) and len(trained) == 20 - 7
    assert pairs.stats.held_out_rows == 7 * 5


def test_the_split_does_not_depend_on_the_row_order():
    splits = []
    for order in (None, 1, 2):
        dataset = _toy(order)
        draws, _ = sample_user_draws(dataset, num_pairs=4)
        splits.append(make_held_out_split(dataset, draws, num_validation_users=2, eval_user_fraction=0.25))
    assert splits[0] == splits[1] == splits[2] and len(splits[0].evaluation_users) == 5


def test_string_ids_stay_strings_and_numpy_ids_become_plain(tmp_path):
    split = HeldOutSplit(evaluation_users=["7", np.int64(7)], validation_users=[], rows={"7": 2})
    loaded = load_held_out_split(split.save(tmp_path / "split.json"))
    assert loaded.evaluation_users == ["7", 7] and [type(u) for u in loaded.evaluation_users] == [str, int]
    assert loaded.rows == {"7": 2, 7: 0}


def test_loading_a_missing_or_foreign_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no held_out_users.json"):
        load_held_out_split(tmp_path)
    with pytest.raises(ValueError, match="is neither a folder, a file nor a Hub repo id"):
        load_held_out_split(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="`format_version` is 99"):
        load_held_out_split(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format_version": 1, "evaluation_users": [{"id": 1}]}))
    with pytest.raises(ValueError, match="malformed"):
        load_held_out_split(tmp_path / "bad.json")


def test_the_model_card_names_the_split_and_the_leakage_rule():
    args = PPDTrainingArguments(dataset_name="yuvalkirstain/pickapic_v2", user_embeddings="u.safetensors",
                                output_dir="runs/ppd-adapter")  # fmt: skip
    config = {"user_embed_dim": 4, "num_user_tokens": 2, "user_token_dim": 8}
    pairs = PreferencePairsDataset(_dataset(), _embeddings(2), DRAWS)
    split = HeldOutSplit(evaluation_users=[1, 2, 3], validation_users=[4], candidate_users=40, seed=0)
    card = str(adapter_model_card(args, config, pairs.stats, {"loss": 0.5}, 10, 4, held_out=split))
    assert "3 users were held out for evaluation and 1 for the\nvalidation images" in card
    assert "among 40 users" in card and f"[`{HELD_OUT_FILE}`]({HELD_OUT_FILE})" in card
    assert "Evaluate this adapter on the evaluation users only" in card
    assert 'load_held_out_split("ppd-adapter").evaluation_users' in card
    assert "3 rows that built their user's embedding and\n3 rows sharing a prompt or an image" in card
    assert "compared by row, caption and image uid" in card
    without = str(adapter_model_card(args, config, pairs.stats, {"loss": 0.5}, 10, 4))
    assert "## Held-out users" not in without and "## Held-out users" in card


def test_a_resumed_run_keeps_the_recorded_split_and_an_older_run_gets_no_evaluation_users(tmp_path, caplog):
    from ppd_diffusers.training.pickapic import stable_seed
    from ppd_diffusers.training.trainer import _held_out_split

    dataset = _toy()
    draws, _ = sample_user_draws(dataset, num_pairs=4)
    args = PPDTrainingArguments(dataset_name="toy", user_embeddings="u", eval_user_fraction=0.2, seed=3)
    fresh = _held_out_split(args, dataset, draws, checkpoint=None)
    assert (len(fresh.evaluation_users), len(fresh.validation_users), fresh.seed) == (4, 4, 0)

    # a checkpoint of a run that recorded no split (an older version): it may have trained on anyone but its
    # validation users, which that version ranked with `seed`
    (tmp_path / "old" / "checkpoint-2").mkdir(parents=True)
    older = _held_out_split(args, dataset, draws, checkpoint=str(tmp_path / "old" / "checkpoint-2"))
    ranked = sorted({d.user_id for d in draws}, key=lambda u: stable_seed(3, "validation", repr(u)))
    assert older.evaluation_users == [] and older.validation_users == ranked[:4]
    assert "resuming holds out no evaluation users" in caplog.text

    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    recorded = HeldOutSplit(evaluation_users=[1003], validation_users=[1004], seed=9)
    recorded.save(tmp_path / "run")
    kept = _held_out_split(args, dataset, draws, checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert (kept.evaluation_users, kept.validation_users, kept.seed) == ([1003], [1004], 9)
    assert "Resuming keeps the held-out users recorded in" in caplog.text
