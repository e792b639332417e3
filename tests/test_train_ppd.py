"""`examples/train_ppd.py` and the training data: tiny Stable Cascade, a generated Pick-a-Pic dataset."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ppd_diffusers.testing_utils import save_tiny_stable_cascade
from ppd_diffusers.training import (
    PPDTrainingArguments,
    PreferencePairsDataset,
    UserDraw,
    collate_preference_pairs,
    load_held_out_split,
    load_user_embeddings,
)

from .toy_pickapic import toy_rows, user_embedding_of, write_toy_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ppd.py"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CORRUPT_ROW = 3  # toy_rows(corrupt=True): jpg_1 of this row is not an image


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train_ppd")
    prior, decoder = str(root / "stable-cascade-prior"), str(root / "stable-cascade")
    save_tiny_stable_cascade(prior, decoder)
    return {"prior": prior, "decoder": decoder, **write_toy_data(root)}


def _dataset(paths: dict[str, str], latents: bool):
    import datasets

    if latents:
        return datasets.load_from_disk(paths["latents"])
    return datasets.load_dataset("parquet", data_files=paths["images"], split="train")


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------- data


def test_pairs_dataset_joins_users_drops_ties_and_profile_rows(repos):
    dataset = _dataset(repos, latents=True)
    embeddings, draws, _ = load_user_embeddings(repos["user_embeddings"])
    pairs = PreferencePairsDataset(dataset, embeddings, draws, exclude_users=["user1", "user6"])
    # 8 users x (10 pairs + 1 tie); every user has one draw of 4 pairs; two users held out
    stats = pairs.stats
    assert (stats.rows, stats.ties, stats.rows_without_user_embedding, stats.held_out_rows) == (88, 8, 0, 20)
    assert (stats.profile_rows, stats.leaking_rows, stats.compared_image_uids) == (24, 0, True)
    assert (stats.pairs, stats.users) == (36, 6) == (len(pairs), 6)
    profile = {row for draw in draws for row in draw.rows}
    for i in range(len(pairs)):
        example = pairs[i]
        if example["skipped"]:
            continue
        user = example["user_id"]
        assert user not in ("user1", "user6") and example["row"] not in profile
        assert dataset[example["row"]]["label_0"] != 0.5
        torch.testing.assert_close(example["user_embeds"], user_embedding_of(user))
        # the toy user's taste is in the sign of the latents: the preferred ones come first
        sign = user_embedding_of(user)[0, 0].item()
        assert sign * example["latents_chosen"].float().mean() > 0 > sign * example["latents_rejected"].float().mean()


def test_pairs_dataset_rows_of_several_draws_join_another_draw():
    rows = toy_rows(users=1, pairs=6, ties=0, corrupt=False)
    import datasets

    dataset = datasets.Dataset.from_dict(rows)
    draws = [UserDraw("user0", 0, (0, 1, 2, 3)), UserDraw("user0", 1, (2, 3, 4, 5))]
    embeddings = torch.stack([torch.zeros(1, 8), torch.ones(1, 8)])
    pairs = PreferencePairsDataset(dataset, embeddings, draws)
    # rows 2 and 3 built both embeddings; 0/1 train with draw 1, 4/5 with draw 0
    assert pairs.stats.profile_rows == 2
    joined = {int(r): int(e) for r, e in zip(pairs.rows, pairs.embedding_of_row)}
    assert joined == {0: 1, 1: 1, 4: 0, 5: 0}


def test_unreadable_images_are_skipped_and_counted_through_dataloader_workers(repos):
    dataset = _dataset(repos, latents=False)
    embeddings, draws, _ = load_user_embeddings(repos["user_embeddings"])
    pairs = PreferencePairsDataset(dataset, embeddings, draws, image_transform=_pixels)
    assert CORRUPT_ROW in pairs.rows  # the corrupt row is a training row of its user
    position = int(np.flatnonzero(pairs.rows == CORRUPT_ROW)[0])
    example = pairs[position]
    assert example["skipped"] == 1 and example["row"] == int(pairs.rows[position + 1])
    # the preferred image comes first: for user0 (likes bright) the chosen pixels are the brighter ones
    assert example["pixels_chosen"].mean() > example["pixels_rejected"].mean()
    loader = torch.utils.data.DataLoader(pairs, batch_size=5, num_workers=2, collate_fn=collate_preference_pairs)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 1
    assert sum(len(b["row"]) for b in batches) == len(pairs)
    assert batches[0]["pixels_chosen"].shape == (5, 3, 32, 32) and batches[0]["user_embeds"].shape == (5, 1, 8)
    # with precomputed latents the row flagged `latents_ok=False` is skipped the same way
    latents = PreferencePairsDataset(_dataset(repos, latents=True), embeddings, draws)
    assert latents[position]["skipped"] == 1


def test_pairs_dataset_errors(repos):
    dataset = _dataset(repos, latents=False)
    embeddings, draws, _ = load_user_embeddings(repos["user_embeddings"])
    with pytest.raises(ValueError, match="image_transform"):
        PreferencePairsDataset(dataset, embeddings, draws)
    with pytest.raises(ValueError, match="one row per draw"):
        PreferencePairsDataset(dataset, embeddings[:-1], draws, image_transform=_pixels)
    wrong = [UserDraw("user0", 0, (15, 16, 17, 18))] + draws[1:]
    with pytest.raises(ValueError, match="belongs to user 'user1'"):
        PreferencePairsDataset(dataset, embeddings, wrong, image_transform=_pixels)


@pytest.mark.parametrize("label", [0.7, 2.0, float("nan"), -1])
def test_labels_other_than_0_half_and_1_are_refused_with_their_row(repos, label):
    from ppd_diffusers.training import pair_from_row, sample_user_draws

    dataset = _dataset(repos, latents=False)
    labels = list(dataset["label_0"])
    labels[5] = label
    bad = dataset.remove_columns("label_0").add_column("label_0", labels)
    embeddings, draws, _ = load_user_embeddings(repos["user_embeddings"])
    with pytest.raises(ValueError, match=r"`label_0` of dataset row 5 is \S+: Pick-a-Pic labels are 1"):
        PreferencePairsDataset(bad, embeddings, draws, image_transform=_pixels)
    with pytest.raises(ValueError, match="`label_0` of dataset row 5"):
        sample_user_draws(bad, num_pairs=4)
    with pytest.raises(ValueError, match=r"`label_0` is \S+: Pick-a-Pic labels"):
        pair_from_row(bad[5])


def test_a_missing_column_is_named(repos):
    dataset = _dataset(repos, latents=False).remove_columns("label_0")
    embeddings, draws, _ = load_user_embeddings(repos["user_embeddings"])
    with pytest.raises(ValueError, match=r"The dataset has no `label_0` column: training pairs need caption, label_0"):
        PreferencePairsDataset(dataset, embeddings, draws, image_transform=_pixels)


def test_help_is_readable_and_missing_arguments_give_a_usage_message():
    import argparse

    from ppd_diffusers.training import PPDTrainingArguments

    parser = PPDTrainingArguments.argument_parser(SCRIPT.read_text().split('"""')[1])
    text = parser.format_help()
    assert "pickapic-latents \\\n        --user_embeddings" in text  # the description keeps its lines
    assert "~25% slower" in text and "{'" not in text  # a % in a help string used to print a dict
    entries = re.split(r"\n  --", text)
    assert not [e for e in entries if e.count("default:") > 1]  # no default given twice
    assert not [e for e in entries if e.startswith("dataset_name") and "(default:" in e]
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(args=["--output_dir", "x"])
    assert exit_info.value.code == 2
    assert isinstance(parser, argparse.ArgumentParser)
    usage = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert usage.returncode == 2 and "the following arguments are required: --dataset_name" in usage.stderr
    assert "Traceback" not in usage.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("all_ties", "No training pairs in"),
        ("no_caption", "The dataset has no `caption` column"),
        ("no_jpg_1", "The dataset has no `jpg_1` column"),
    ],
)
def test_bad_data_is_reported_before_any_model_loads(repos, tmp_path, change, message):
    from .toy_pickapic import write_parquet

    rows = {k: v for k, v in toy_rows().items() if not k.startswith("latents")}
    if change == "all_ties":
        rows["label_0"] = [0.5] * len(rows["label_0"])
    else:
        del rows[change.removeprefix("no_")]
    data = write_parquet(tmp_path / "data.parquet", rows)
    # a Stage C that does not exist: the data must fail first, with its own message
    args = _args(repos, tmp_path / "out", latents=False, dataset_name=data, pretrained_model_name_or_path="/no/model")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_training_arguments_reject_bad_values():
    with pytest.raises(ValueError, match="`dataset_name` is required"):
        PPDTrainingArguments(user_embeddings="u.safetensors")
    base = dict(dataset_name="d", user_embeddings="u.safetensors")
    with pytest.raises(ValueError, match="`user_dropout` must be a probability"):
        PPDTrainingArguments(**base, user_dropout=1.5)
    with pytest.raises(ValueError, match="black"):
        PPDTrainingArguments(**base, mixed_precision="fp16")
    with pytest.raises(ValueError, match="`train_batch_size` must be a positive integer"):
        PPDTrainingArguments(**base, train_batch_size=0)


# ----------------------------------------------------------------------------------------------- the script


def _args(repos: dict[str, str], out: Path, latents: bool = True, **overrides) -> list[str]:
    settings = dict(
        dataset_name=repos["latents"] if latents else repos["images"],
        user_embeddings=repos["user_embeddings"],
        pretrained_model_name_or_path=repos["prior"],
        resolution=32,
        resolution_multiple=8,
        latent_dim_scale=2,
        num_user_tokens=2,
        user_token_dim=16,
        output_dir=str(out),
        learning_rate=1e-3,
        lr_warmup_steps=2,
        beta_dpo=500,
        train_batch_size=4,
        user_dropout=0.0,
        prompt_dropout=0.1,
        num_validation_users=2,
        report_to="none",
        validation_steps=1000,
        seed=0,
    )
    settings.update(overrides)
    args = []
    for key, value in settings.items():
        args += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return args


def _run(args: list[str], launcher: list[str] | None = None, env: dict | None = None) -> str:
    command = [*(launcher or [sys.executable, str(SCRIPT)]), *args]
    full_env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=full_env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def _losses(out: Path) -> list[float]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_script_trains_and_the_pipeline_loads_the_adapter(repos, tmp_path):
    from ppd_diffusers import PersonalizedStableCascadePipeline

    out = tmp_path / "adapter"
    log = _run(
        _args(
            repos, out, max_train_steps=18, decoder_model_name_or_path=repos["decoder"], validation_steps=9,
            validation_inference_steps=2, validation_prompts=["a cat", "a dog"], report_to="tensorboard",
        )
    )  # fmt: skip
    # 18 steps of 4 pairs: two epochs over the 36 pairs, each passing over the unreadable row once
    assert "36 training pairs of 6 users" in log and "unreadable images met 2 times" in log
    losses = _losses(out)
    assert len(losses) == 18
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter is the base model
    assert np.mean(losses[-4:]) < 0.5 * math.log(2)
    assert sorted(os.listdir(out / "validation")) == ["step-000009.png", "step-000018.png"]
    card = (out / "README.md").read_text()
    assert "library_name: ppd-diffusers" in card and "| `beta_dpo` | 500.0 |" in card and "36 training pairs" in card
    # 8 users x the default `eval_user_fraction` 0.1 rounds down to no evaluation user; 2 validation users
    split = load_held_out_split(out)
    assert (split.evaluation_users, len(split.validation_users), split.rows) == ([], 2, {u: 10 for u in split.users})
    assert "held_out_rows=20" in log and "0 users were held out for evaluation and 2 for the" in card
    assert any(p.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for p in files)

    pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
        out, prior_model_name_or_path=repos["prior"], decoder_model_name_or_path=None, resolution_multiple=8
    )
    saved = load_file(out / WEIGHTS)
    assert all(torch.equal(saved[k], v) for k, v in pipe.user_adapter.state_dict().items())
    users = torch.cat([user_embedding_of("user0"), user_embedding_of("user1")]).unsqueeze(1)

    def latents(scale: float) -> torch.Tensor:
        generator = [torch.Generator().manual_seed(0) for _ in range(2)]
        call = dict(height=32, width=32, num_inference_steps=4, output_type="latent", generator=generator)
        return pipe(["a cat", "a cat"], user_embeds=users, user_scale=scale, **call).images

    personalized, base = latents(1.0), latents(0.0)
    # the trained adapter moves the bright-liking user's latents up and the other's down, relative to the base
    assert (personalized - base)[0].mean() > 0 > (personalized - base)[1].mean()


@pytest.mark.slow  # a minute or more of CPU: CI runs it with `pytest -m slow`
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(repos, tmp_path):
    from diffusers import StableCascadeUNet

    from ppd_diffusers import StageCImageEncoder, UserAdapter

    from .conftest import randomize_

    # images decoded and encoded every step (the slower path), so the kill lands mid-run; starting from a saved
    # adapter, so nothing but the seed arguments fixes the data order
    torch.manual_seed(0)
    StageCImageEncoder(latent_channels=4).save_pretrained(tmp_path / "effnet")
    prior = StableCascadeUNet.from_pretrained(repos["prior"], subfolder="prior")
    start = randomize_(UserAdapter.from_unet(prior, user_embed_dim=8, num_user_tokens=2, user_token_dim=16), std=0.05)
    start.save_pretrained(tmp_path / "start")
    # 36 pairs in batches of 2, 5 batches per step: 4 steps an epoch, the last one of 3 batches
    common = dict(latents=False, image_encoder=str(tmp_path / "effnet"), resolution=170, max_train_steps=30)
    common.update(checkpointing_steps=3, checkpoints_total_limit=2, gradient_accumulation_steps=5, train_batch_size=2)
    common.update(adapter_name_or_path=str(tmp_path / "start"))
    whole = tmp_path / "whole"
    _run(_args(repos, whole, **common))

    killed = tmp_path / "killed"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *_args(repos, killed, **common)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-6").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (killed / WEIGHTS).exists()
    # step 6 is the second of epoch 1: the resumed run reshuffles for that epoch and skips its first 10 batches
    log = _run(_args(repos, killed, resume_from_checkpoint="latest", **common))
    assert "Resumed from" in log
    expected, resumed = load_file(whole / WEIGHTS), load_file(killed / WEIGHTS)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert _losses(killed) == _losses(whole) and len(_losses(killed)) == 30  # one line per step, none twice
    assert sorted(p for p in os.listdir(killed) if p.startswith("checkpoint")) == ["checkpoint-27", "checkpoint-30"]


def test_output_dir_bookkeeping(tmp_path):
    from ppd_diffusers.training.checkpoints import list_checkpoints, prepare_output_dir, resolve_resume

    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-4", "checkpoint-12.tmp", "other"):
        (tmp_path / name).mkdir()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "loss": 0.5}) + "\n" for step in range(1, 13)))
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-10",
    ]
    with pytest.raises(ValueError, match=r"already holds a training run's outputs \(checkpoint-10, checkpoint-2"):
        prepare_output_dir(str(tmp_path), None, str(metrics))
    assert resolve_resume(str(tmp_path), "latest").endswith("checkpoint-10")
    with pytest.raises(ValueError, match="must be a `checkpoint-N` folder"):
        resolve_resume(str(tmp_path), str(tmp_path / "other"))
    # resuming from an older checkpoint: the newer ones and their metric lines go, as does a killed save
    prepare_output_dir(str(tmp_path), str(tmp_path / "checkpoint-4"), str(metrics))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl", "other"]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert resolve_resume(str(tmp_path / "new"), "latest") is None


def _layout(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if name.startswith("checkpoint-") else path.write_text(name)


def test_a_new_run_never_overwrites_an_earlier_one_unless_told(tmp_path):
    from ppd_diffusers.training.checkpoints import prepare_output_dir

    out, metrics = tmp_path / "out", tmp_path / "out" / "logs" / "metrics.jsonl"
    _layout(out, "README.md", "config.json", "diffusion_pytorch_model.safetensors", "logs/metrics.jsonl", "notes.txt")
    _layout(out, "checkpoint-3", "validation/step-3.png")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    expected = r"already holds a training run's outputs \(checkpoint-3, README.md, config.json, diffusion_pytorch"
    for resuming in (False, True):  # `latest` without a checkpoint is no licence to overwrite a finished run
        with pytest.raises(ValueError, match=expected):
            prepare_output_dir(str(out), None, str(metrics), resuming=resuming)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched
    prepare_output_dir(str(out), None, str(metrics), overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == ["logs", "notes.txt"]  # only what a run writes went


def test_a_run_killed_before_its_first_checkpoint_restarts_in_place(tmp_path):
    from ppd_diffusers.training.checkpoints import prepare_output_dir

    out, metrics = tmp_path / "out", tmp_path / "out" / "logs" / "metrics.jsonl"
    _layout(out, "logs/metrics.jsonl", "logs/events.out.tfevents.1")
    with pytest.raises(ValueError, match=r"outputs \(logs/metrics.jsonl\)"):
        prepare_output_dir(str(out), None, str(metrics))
    prepare_output_dir(str(out), None, str(metrics), resuming=True)
    assert sorted(p.name for p in out.rglob("*")) == ["events.out.tfevents.1", "logs"]


def test_resuming_from_another_folder_deletes_nothing(tmp_path):
    from ppd_diffusers.training.checkpoints import prepare_output_dir

    source, target = tmp_path / "a", tmp_path / "b"
    _layout(source, "checkpoint-5", "checkpoint-9", "logs/metrics.jsonl")
    _layout(target, "checkpoint-7", "logs/metrics.jsonl")
    sources, targets = sorted(source.rglob("*")), sorted(target.rglob("*"))
    with pytest.raises(ValueError, match="already holds a training run's outputs"):
        prepare_output_dir(str(target), str(source / "checkpoint-5"), str(target / "logs" / "metrics.jsonl"))
    assert sorted(target.rglob("*")) == targets and (target / "logs" / "metrics.jsonl").read_text()
    fresh = tmp_path / "c"
    prepare_output_dir(str(fresh), str(source / "checkpoint-5"), str(fresh / "logs" / "metrics.jsonl"))
    assert sorted(source.rglob("*")) == sources  # the later checkpoint-9 of the source run stays


def test_changed_settings_name_what_differs(tmp_path):
    from ppd_diffusers.training.checkpoints import SETTINGS_FILE, changed_settings

    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"seed": 0, "learning_rate": 1e-5, "output_dir": "a"}))
    now = {"seed": 1, "learning_rate": 1e-5, "output_dir": "b", "new_setting": 3}
    assert changed_settings(str(tmp_path), now, ignored={"output_dir"}) == {"seed": (0, 1)}
    assert changed_settings(str(tmp_path / "old-checkpoint"), now, ignored=set()) == {}


def test_rerun_is_refused_and_changed_settings_on_resume_are_named(repos, tmp_path):
    out = tmp_path / "run"
    log = _run(_args(repos, out, max_train_steps=2, checkpointing_steps=1, eval_user_fraction=0.25))
    # 2 evaluation and 2 validation users of 8 held out: 4 users x (10 pairs - 4 profile rows) train
    split = load_held_out_split(out)
    assert (len(split.evaluation_users), len(split.validation_users)) == (2, 2)
    assert not set(split.evaluation_users) & set(split.validation_users)
    assert "24 training pairs of 4 users" in log and "held_out_rows=40" in log
    assert "2 evaluation and 2 validation users held out (held_out_users.json)" in log
    assert "2 users were held out for evaluation" in (out / "README.md").read_text()
    weights = (out / WEIGHTS).read_bytes()
    again = subprocess.run([sys.executable, str(SCRIPT), *_args(repos, out, max_train_steps=2)], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    assert again.returncode != 0 and "--overwrite_output_dir" in again.stderr
    assert (out / WEIGHTS).read_bytes() == weights and len(_losses(out)) == 2  # nothing overwritten or appended
    resumed = dict(max_train_steps=3, learning_rate=2e-3, eval_user_fraction=0.25, held_out_seed=1)
    log = _run(_args(repos, out, resume_from_checkpoint="latest", **resumed))
    assert "Resuming with settings that differ from the checkpoint's" in log
    assert "`held_out_seed` 0 -> 1; `learning_rate` 0.001 -> 0.002; `max_train_steps` 2 -> 3" in log
    # users trained before the checkpoint must not become evaluation users: the recorded split stays
    assert "Resuming keeps the held-out users recorded in" in log and "24 training pairs of 4 users" in log
    assert load_held_out_split(out) == split
    assert len(_losses(out)) == 3


def test_bf16_and_a_subset_of_the_pairs(repos, tmp_path):
    out = tmp_path / "bf16"
    log = _run(_args(repos, out, max_train_steps=3, mixed_precision="bf16", max_train_samples=10, train_batch_size=2))
    assert re.search(r"10 training pairs of [1-6] users", log)  # 6 users train; a subset of 10 has fewer
    # a fresh adapter adds exact zeros, in bf16 too: the policy equals the reference
    assert _losses(out)[0] == pytest.approx(math.log(2), abs=1e-6)
    saved = load_file(out / WEIGHTS)
    assert {v.dtype for v in saved.values()} == {torch.float32}  # the adapter trains (and is saved) in fp32


@pytest.mark.slow  # a minute or more of CPU: CI runs it with `pytest -m slow`
def test_torch_compile_trains_the_same_weights(repos, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _run(_args(repos, eager, max_train_steps=3, gradient_checkpointing=True))
    log = _run(_args(repos, compiled, max_train_steps=3, gradient_checkpointing=True, torch_compile=True))
    assert re.search(r"torch.compile: \d+ Stage C blocks", log)
    assert _losses(compiled)[0] == pytest.approx(math.log(2), abs=1e-6)
    np.testing.assert_allclose(_losses(compiled), _losses(eager), rtol=1e-4)
    trained, reference = load_file(compiled / WEIGHTS), load_file(eager / WEIGHTS)
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-3, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_weights(repos, tmp_path):
    out = tmp_path / "ddp"
    driver = tmp_path / "driver.py"
    # the example's own `main`, then each process writes the weights it holds
    driver.write_text(
        "import importlib.util, os, sys\n"
        "from safetensors.torch import save_file\n"
        f"spec = importlib.util.spec_from_file_location('train_ppd', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "result = module.main()\n"
        "rank = os.environ['RANK']\n"
        f"save_file(result.adapter.state_dict(), os.path.join({str(tmp_path)!r}, f'rank{{rank}}.safetensors'))\n"
    )
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(_free_port()), str(driver)]
    # ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets; with --multi_gpu it gives 2 CPU processes (gloo)
    log = _run(_args(repos, out, max_train_steps=6, train_batch_size=2), launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert "x 2 processes" in log
    first, second = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    saved = load_file(out / WEIGHTS)
    assert all(torch.equal(first[k], saved[k]) for k in first)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "to_v_user" in k)  # trained, not the zero init


def test_validation_grid_puts_the_base_model_first_then_each_user(repos):
    from ppd_diffusers import PersonalizedStableCascadePipeline, UserAdapter
    from ppd_diffusers.training import validation_grid

    from .conftest import randomize_

    pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
        prior_model_name_or_path=repos["prior"],
        decoder_model_name_or_path=repos["decoder"],
        resolution_multiple=8,
        latent_dim_scale=2,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_user_adapter(randomize_(UserAdapter.from_unet(pipe.prior, user_embed_dim=8), std=0.3))
    users = torch.cat([user_embedding_of("user0"), user_embedding_of("user1")]).unsqueeze(1)
    call = dict(num_inference_steps=3, height=32, width=32)
    grid = validation_grid(pipe, users, ["a cat", "a dog"], guidance_scale=2.0, seed=5, **call)
    tiles = [[np.asarray(grid.crop((c * 32, r * 32, c * 32 + 32, r * 32 + 32)), dtype=float) for c in range(3)]
             for r in range(2)]  # fmt: skip
    assert grid.size == (3 * 32, 2 * 32)
    for row, prompt in enumerate(["a cat", "a dog"]):
        # column 0 is the plain base model from the row's seed; the users' columns differ from it and each other
        base = pipe(prompt, guidance_scale=2.0, generator=torch.Generator().manual_seed(5 + row), **call).images[0]
        assert np.abs(tiles[row][0] - np.asarray(base, dtype=float)).max() <= 1
        assert np.abs(tiles[row][1] - tiles[row][0]).mean() > 1 and np.abs(tiles[row][2] - tiles[row][1]).mean() > 1
