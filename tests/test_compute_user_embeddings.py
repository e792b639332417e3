"""Pick-a-Pic draws and `examples/compute_user_embeddings.py` end to end on a tiny generated dataset."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ppd_diffusers import PreferenceEncoder
from ppd_diffusers.training import load_user_embeddings, pair_from_row, sample_user_draws

from .toy_pickapic import write_parquet

ROOT = Path(__file__).resolve().parents[1]
# user -> (non-tied pairs, ties); "carol" has too few pairs for a draw of 4
USERS = {"alice": (6, 2), "bob": (4, 0), "carol": (2, 0), "dave": (5, 1), "erin": (4, 0)}


def _png(rng) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_rows(seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "user_id": [], "ranking_id": []}
    for user, (pairs, ties) in USERS.items():
        for i in range(pairs + ties):
            label = 0.5 if i >= pairs else float(i % 2)
            rows["caption"].append(f"{user} prompt {i}")
            rows["jpg_0"].append(_png(rng))
            rows["jpg_1"].append(_png(rng))
            rows["label_0"].append(label)
            rows["label_1"].append(1 - label)
            rows["user_id"].append(user)
            rows["ranking_id"].append(len(rows["ranking_id"]))
    return rows


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> str:
    return write_parquet(tmp_path_factory.mktemp("pickapic") / "train.parquet", pickapic_rows())


def test_draws_drop_ties_skip_small_users_and_are_reproducible():
    rows = pickapic_rows()
    draws, stats = sample_user_draws(rows, num_pairs=4, draws=3, seed=1)
    assert (stats.rows, stats.ties, stats.users, stats.users_with_too_few_pairs) == (24, 3, 4, 1)
    assert stats.draws == len(draws) == 12
    for draw in draws:
        assert len(set(draw.rows)) == 4
        assert all(rows["user_id"][r] == draw.user_id and rows["label_0"][r] != 0.5 for r in draw.rows)
    assert [d.user_id for d in draws[::3]] == ["alice", "bob", "dave", "erin"]
    assert sample_user_draws(rows, num_pairs=4, draws=3, seed=1)[0] == draws
    assert sample_user_draws(rows, num_pairs=4, draws=3, seed=2)[0] != draws
    # other users' rows do not change a user's draws: put the users in reverse order, compare by content
    order = sorted(range(24), key=lambda r: (-list(USERS).index(rows["user_id"][r]), r))
    shuffled = {k: [v[i] for i in order] for k, v in rows.items()}
    by_content = {(d.user_id, d.draw): [rows["caption"][r] for r in d.rows] for d in draws}
    reshuffled = sample_user_draws(shuffled, num_pairs=4, draws=3, seed=1)[0]
    assert {(d.user_id, d.draw): [shuffled["caption"][r] for r in d.rows] for d in reshuffled} == by_content


def test_pair_from_row_puts_the_preferred_image_first():
    row = {"caption": "c", "jpg_0": b"zero", "jpg_1": b"one", "label_0": 0.0}
    assert pair_from_row(row).chosen == b"one"
    assert pair_from_row({**row, "label_0": 1.0}).chosen == b"zero"
    with pytest.raises(ValueError, match="tied pair"):
        pair_from_row({**row, "label_0": 0.5})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], launcher: list[str] | None = None) -> str:
    command = [*(launcher or [sys.executable]), str(ROOT / "examples" / "compute_user_embeddings.py"), *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_example_end_to_end_resumes_from_the_cache(dataset_file, tiny_llava_dir, tmp_path):
    import datasets

    from ppd_diffusers import UserEmbeddingCache
    from ppd_diffusers.training import encode_user_draws

    out = tmp_path / "out"
    dataset = datasets.load_dataset("parquet", data_files=dataset_file, split="train")
    # a run killed after 3 of its 8 users: their embeddings are in the cache already
    encoder = PreferenceEncoder.from_pretrained(tiny_llava_dir, layer=2, dtype="float32", device_map="cpu")
    draws, _ = sample_user_draws(dataset, num_pairs=4, draws=2, seed=0)
    encode_user_draws(UserEmbeddingCache(out / "cache", encoder), dataset, draws[:3])
    args = ["--dataset", dataset_file, "--encoder", tiny_llava_dir, "--layer", "2", "--draws", "2"]
    args += ["--dtype", "float32", "--batch_size", "3", "--output_dir", str(out)]
    log = _run(args)
    assert "24 rows, 3 ties dropped; 4 users with a draw, 1 with fewer than 4 pairs skipped; 8 draws" in log
    assert "3 from the cache, 5 encoded, 0 draws with unreadable images left out" in log
    embeddings, draws, meta = load_user_embeddings(out / "user_embeddings.safetensors")
    assert embeddings.shape == (8, 1, 32) and len(draws) == 8
    assert json.loads((out / "stats.json").read_text())["ties"] == 3
    encoder = PreferenceEncoder.from_pretrained(out / "encoder")
    assert meta["encoder_fingerprint"] == encoder.fingerprint()
    expected = encoder.encode([[pair_from_row(dataset[r]) for r in d.rows] for d in draws])
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)
    # a repeated run encodes nothing
    log = _run(args)
    assert "8 from the cache, 0 encoded, 0 draws" in log
    assert torch.equal(load_user_embeddings(out / "user_embeddings.safetensors")[0], embeddings)


def test_example_keeps_the_options_of_a_saved_encoder(dataset_file, tiny_llava_dir, tmp_path):
    saved = tmp_path / "encoder"
    PreferenceEncoder.from_pretrained(
        tiny_llava_dir, layer=1, pooling="last_k", num_pooled_tokens=3, num_pairs=2
    ).save_pretrained(saved)
    log = _run(
        ["--dataset", dataset_file, "--encoder", str(saved), "--dtype", "float32", "--output_dir", str(tmp_path / "o")]
    )
    assert "5 users with a draw, 0 with fewer than 2 pairs skipped; 5 draws" in log  # carol's 2 pairs now count
    embeddings, draws, _ = load_user_embeddings(tmp_path / "o" / "user_embeddings.safetensors")
    assert embeddings.shape == (5, 3, 32) and all(len(d.rows) == 2 for d in draws)


def test_example_splits_users_across_processes(dataset_file, tiny_llava_dir, tmp_path):
    args = ["--dataset", dataset_file, "--encoder", tiny_llava_dir, "--layer", "2", "--dtype", "float32"]
    single = _run([*args, "--output_dir", str(tmp_path / "one")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    log = _run([*args, "--output_dir", str(tmp_path / "two")], launcher)
    assert "process 0: 0 from the cache, 2 encoded," in log and "process 1: 0 from the cache, 2 encoded," in log
    one, draws_one, _ = load_user_embeddings(tmp_path / "one" / "user_embeddings.safetensors")
    two, draws_two, _ = load_user_embeddings(tmp_path / "two" / "user_embeddings.safetensors")
    assert draws_one == draws_two
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert not [f for f in os.listdir(tmp_path / "two") if f.startswith("shard-")]
    assert single


def test_unreadable_images_leave_out_their_draw_and_are_named_with_their_row(tiny_llava_dir, tmp_path):
    rows = pickapic_rows()
    bad_row = rows["user_id"].index("dave") + 1  # a non-tied pair of dave's
    rows["jpg_1"][bad_row] = b"not an image"
    data = write_parquet(tmp_path / "bad.parquet", rows)
    args = ["--dataset", data, "--encoder", tiny_llava_dir, "--layer", "2", "--dtype", "float32"]
    args += ["--output_dir", str(tmp_path / "out")]
    for attempt in range(2):  # a re-run does not fail at the same row either: it skips it again
        log = _run(args)
        assert f"process 0: {3 if attempt else 0} from the cache" in log
    assert f"Left out user 'dave', draw 0: dataset row {bad_row}" in log
    embeddings, draws, meta = load_user_embeddings(tmp_path / "out" / "user_embeddings.safetensors")
    assert [d.user_id for d in draws] == ["alice", "bob", "erin"] and embeddings.shape[0] == 3
    assert [(r["user_id"], r["row"]) for r in meta["unreadable"]] == [("dave", bad_row)]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["draws_left_out_unreadable"][0]["row"] == bad_row


def test_empty_data_is_named(tmp_path):
    import datasets

    from ppd_diffusers.training import load_pickapic_dataset

    columns = {"caption": [], "label_0": [], "user_id": []}
    datasets.Dataset.from_dict(columns).to_parquet(tmp_path / "rows.parquet")
    datasets.Dataset.from_dict(columns).save_to_disk(tmp_path / "saved")
    (tmp_path / "rows.jsonl").write_text("")
    for name in ("rows.parquet", "saved", "rows.jsonl"):
        with pytest.raises(ValueError, match=r"\(split 'train'\) holds no rows"):
            load_pickapic_dataset(tmp_path / name)
