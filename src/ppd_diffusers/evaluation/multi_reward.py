r"""The paper's multi-reward experiment as one resumable recipe: each reward model is one user.

PPD (CVPR 2025, section "multi-reward") makes users out of reward models: pairs of Stable Cascade images are
labelled by CLIP score, LAION aesthetic and HPS, each labelling is one user, each user is known to the model
only through the embedding of 4 of its pairs, and one PPD adapter is trained for all of them. It is compared
with pooled Diffusion-DPO (all labels, no user) and with each single-reward DPO (one reward's labels only, an
upper bound for that reward). ``reproduce_multi_reward`` runs it end to end, in stages that each write their
output into ``output_dir`` and are skipped when that output is there, so a killed run restarted with the same
settings picks up where it stopped (training resumes from its last checkpoint):

1. ``prompts.json``, ``images/``: the prompts (``prompts_file`` or a built-in list), split into
   ``num_prompts`` training prompts and ``num_eval_prompts`` held-out prompts; for every training prompt two
   images from two seeds, made by Stable Cascade (Stage C + decoder, no user) and saved as PNG, each with the
   Stage C latents it was decoded from (``.safetensors``, read off the last denoising step).
2. ``pairs/``: one Pick-a-Pic-format row per (pair, reward) (``caption``, ``jpg_0``, ``jpg_1`` as PNG bytes,
   ``label_0``/``label_1``, ``user_id`` = the reward's name, plus ``score_0``/``score_1``, ``prompt_index``
   and the generation latents as ``latents_0``/``latents_1``, the precomputed-latents columns ``train_ppd``
   reads), saved with ``save_to_disk``. ``label_0`` is 1 when the reward scores image 0 higher, 0 when lower
   and 0.5 (a tie, left out of training) when the scores are equal. Training on the generation latents needs
   no image encoder and trains on exactly the latents the labelled images decode from (an EfficientNet
   re-encoding of the images would differ from them). ``pairs_pooled/`` holds the same pairs (images only)
   under one user id, ``"pooled"``, for Diffusion-DPO trainers that take no user.
3. ``user_embeddings/``: each reward-user's embedding from 4 of its non-tied pairs (drawn with ``seed``), by
   the preference encoder, as ``examples/compute_user_embeddings.py`` computes them.
4. ``models/``: ``ppd`` (``train_ppd`` on all reward-users with their embeddings), ``pooled_dpo`` and
   ``bound-<reward>``. All runs train the same parameters (a fresh ``UserAdapter``) for ``max_train_steps``
   steps of ``train_batch_size x gradient_accumulation_steps`` pairs: the baselines are the same adapter fed
   one constant user (a zero embedding), which makes it an ordinary, user-free Diffusion-DPO fine-tune of
   those layers. Pooled DPO trains on exactly PPD's pairs in PPD's order (the same dataset and draws, every
   embedding replaced by the constant), each bound on its reward's pairs only. LoRA or full-UNet Diffusion-DPO
   baselines are not built: ``train_ppd`` trains only the adapter, and a second trainer would give the
   baselines more (or other) parameters than PPD, so the comparison would no longer isolate the user
   conditioning; ``pairs_pooled/`` is there for such a run with an external trainer.
5. ``eval/``, ``results.json``, ``results.md``, ``results.png``: on the held-out prompts, images from the same
   seeds by the base model, PPD with each reward-user's embedding, pooled DPO and each bound, scored by every
   reward; the paper-style table (rows: rewards; columns: base, single-reward bound, pooled DPO, PPD, and PPD's
   share of the bound's gain ``(ppd - base) / (bound - base)`` in %), and a bar figure when matplotlib is
   installed.

Compute at the paper's scale (an estimate from DESIGN.md's anchors, measured on an H200 with a prototype, not
this recipe): Stable Cascade 3.6B at 1024 px, 20 Stage C steps, takes ~0.5-1 s an image in batches (Stage C
~22-55 ms a step per CFG image pair) plus Stage B; with 5,000 Pick-a-Pic prompts stage 1 makes 10,000 images,
~2-4 GPU hours. Stage 2 (three reward models on 10,000 images) and stage 3 (three users) take minutes.
Stage 4 is five runs (PPD, pooled, three bounds); the adapter DPO step does ~10 pairs/s (16 pairs in 1.6 s,
2 s with gradient checkpointing), so 2,000 steps of 16 pairs are ~1 GPU hour a run, ~5 in all. Stage 5
generates ``(2 + 2 x rewards) x num_eval_prompts`` images: 4,000 for 500 prompts, ~1 GPU hour. In all ~8-11
H200 GPU hours (more on an H100), dominated by generation and the five training runs.
The recipe runs in one process on one device (generation, scoring and the five ``train_ppd`` runs in turn);
the reward models stay loaded throughout (~2.5B parameters for CLIP ViT-L/14, the aesthetic head's CLIP and
HPS's ViT-H/14), beside one Stable Cascade at a time.

Examples:
    ```py
    from ppd_diffusers.evaluation.multi_reward import MultiRewardConfig, reproduce_multi_reward

    config = MultiRewardConfig(output_dir="multi-reward", prompts_file="pickapic_prompts.txt", num_prompts=5000,
                               num_eval_prompts=500, max_train_steps=2000, train_batch_size=16)
    results = reproduce_multi_reward(config)  # scorers built from `config.rewards`
    results["table"]["aesthetic"]  # {"base": ..., "bound": ..., "pooled_dpo": ..., "ppd": ..., "share_of_bound": ...}
    ```
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from .multi_reward_config import DEFAULT_PROMPTS, POOLED_USER, MultiRewardConfig
from .multi_reward_report import _mean, results_figure, results_markdown, results_table, share_of_bound
from .records import check_settings
from .scorer import load_reward_scorers, parse_reward_model_paths

__all__ = [
    "DEFAULT_PROMPTS",
    "MultiRewardConfig",
    "compute_user_embeddings",
    "evaluate",
    "generate_pairs",
    "label_pairs",
    "pair_label",
    "reproduce_multi_reward",
    "results_figure",
    "results_markdown",
    "results_table",
    "share_of_bound",
    "split_prompts",
    "train_models",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "multi_reward_config.json"
# settings a resumed run may change: they change how fast the outputs are made, not what they are
SETTINGS_NOT_CHANGING_RESULTS = {
    "output_dir", "device", "generation_batch_size", "scoring_batch_size", "checkpointing_steps", "report_to",
}  # fmt: skip
ADAPTER_WEIGHTS = "diffusion_pytorch_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pair_label(score_0: float, score_1: float) -> float:
    """Pick-a-Pic's ``label_0`` of a pair a reward scored: 1 (image 0 higher), 0 (lower) or 0.5 (equal, a tie).

    Examples:
        >>> pair_label(0.7, 0.2), pair_label(0.2, 0.7), pair_label(0.5, 0.5)
        (1.0, 0.0, 0.5)
    """
    if math.isnan(score_0) or math.isnan(score_1):
        raise ValueError(f"A reward scored a pair NaN ({score_0}, {score_1}): its label is undefined.")
    return 1.0 if score_0 > score_1 else 0.0 if score_0 < score_1 else 0.5


# ------------------------------------------------------------------------------------------------- helpers


def _path(config: MultiRewardConfig, *parts: str) -> str:
    return os.path.join(config.output_dir, *parts)


def _write_json(path: str, value: Any) -> None:
    # written whole, then renamed: a kill never leaves a half file that a resume would take as done
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _device(config: MultiRewardConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _dtype(config: MultiRewardConfig) -> torch.dtype:
    if config.dtype is not None:
        return DTYPES[config.dtype]
    return torch.bfloat16 if _device(config).type == "cuda" else torch.float32


def _seed(config: MultiRewardConfig, *parts: Any) -> int:
    from ..training.pickapic import stable_seed

    return stable_seed(config.seed, *parts) % 2**63


def _load_pipeline(config: MultiRewardConfig) -> Any:
    from ..pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

    pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
        prior_model_name_or_path=config.pretrained_model_name_or_path,
        decoder_model_name_or_path=config.decoder_model_name_or_path,
        prior_subfolder=config.prior_subfolder,
        torch_dtype=_dtype(config),
        variant=config.variant,
        resolution_multiple=config.resolution_multiple,
        latent_dim_scale=config.latent_dim_scale,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(_device(config))


def _generate(
    pipe, config, prompts: list[str], seeds: list[int], paths: list[str], desc: str, user_embeds=None, latents=False
):
    """Generates ``prompts[i]`` from ``seeds[i]`` into ``paths[i]`` (PNG), skipping images already written.

    With ``latents``, each image's final Stage C latents go to ``<path minus .png>.safetensors`` too (read off
    the last denoising step by a step callback), written before the image, which marks it done.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    todo = [i for i, path in enumerate(paths) if not os.path.exists(path)]
    device = _device(config)
    final: dict[str, torch.Tensor] = {}

    def keep_latents(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    for start in tqdm(range(0, len(todo), config.generation_batch_size), desc=desc):
        batch = todo[start : start + config.generation_batch_size]
        call = dict(
            height=config.resolution,
            width=config.resolution,
            num_inference_steps=config.num_inference_steps,
            decoder_num_inference_steps=config.decoder_num_inference_steps,
            guidance_scale=config.guidance_scale,
            # one generator per image: an image depends on its seed only, not on the batch it falls in
            generator=[torch.Generator(device).manual_seed(seeds[i]) for i in batch],
            callback_on_step_end=keep_latents if latents else None,
        )
        if user_embeds is not None:
            call["user_embeds"] = user_embeds.to(device, pipe.prior.dtype)
        images = pipe([prompts[i] for i in batch], **call).images
        for row, (i, image) in enumerate(zip(batch, images, strict=True)):
            os.makedirs(os.path.dirname(paths[i]), exist_ok=True)
            if latents:
                save_file({"latents": final["latents"][row].float().cpu().contiguous()}, _latents_path(paths[i]))
            image.save(paths[i] + ".tmp.png")
            os.replace(paths[i] + ".tmp.png", paths[i])


def _latents_path(image_path: str) -> str:
    return image_path.removesuffix(".png") + ".safetensors"


def _score(scorers: Mapping[str, Callable], images: list, prompts: list[str], batch_size: int) -> dict[str, list]:
    scores = {}
    for name, scorer in scorers.items():
        values = [
            scorer(images[s : s + batch_size], prompts[s : s + batch_size]) for s in range(0, len(images), batch_size)
        ]
        scores[name] = torch.cat(values).float().tolist()
        if len(scores[name]) != len(images):
            raise ValueError(f"The {name!r} scorer returned {len(scores[name])} scores for {len(images)} images.")
    return scores


def _open_images(paths: list[str]) -> list:
    import PIL.Image

    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _save_dataset(dataset: Any, path: str) -> None:
    if os.path.exists(path + ".tmp"):
        shutil.rmtree(path + ".tmp")
    dataset.save_to_disk(path + ".tmp")
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------- stages


def _read_prompts(config: MultiRewardConfig) -> list[str]:
    if config.prompts_file is None:
        prompts = list(DEFAULT_PROMPTS)
    else:
        with open(config.prompts_file) as f:
            text = f.read()
        stripped = text.lstrip()
        prompts = json.loads(text) if stripped.startswith("[") else text.splitlines()
    # first occurrence of each, so that no held-out prompt is also a training prompt
    return list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))


def _check_settings(config: MultiRewardConfig) -> None:
    """Records the settings in ``output_dir`` and refuses to resume a run that made its outputs with others."""
    check_settings(config.output_dir, asdict(config), SETTINGS_NOT_CHANGING_RESULTS, filename=CONFIG_FILE)


def split_prompts(config: MultiRewardConfig) -> dict[str, list[str]]:
    """Stage 1a: the training and held-out prompts (a seeded shuffle of the distinct prompts), in ``prompts.json``."""
    import numpy as np

    path = _path(config, "prompts.json")
    if os.path.exists(path):
        return _read_json(path)
    prompts = _read_prompts(config)
    needed = config.num_prompts + config.num_eval_prompts
    if len(prompts) < needed:
        raise ValueError(
            f"`num_prompts` ({config.num_prompts}) + `num_eval_prompts` ({config.num_eval_prompts}) = {needed} "
            f"distinct prompts are needed, but {config.prompts_file or 'the built-in list'} has {len(prompts)}."
        )
    order = np.random.default_rng(_seed(config, "prompts")).permutation(len(prompts))[:needed]
    chosen = [prompts[i] for i in order]
    split = {"train": chosen[: config.num_prompts], "eval": chosen[config.num_prompts :]}
    _write_json(path, split)
    return split


def _pair_paths(config: MultiRewardConfig, count: int) -> list[tuple[str, str]]:
    return [tuple(_path(config, "images", f"{i:06d}_{k}.png") for k in (0, 1)) for i in range(count)]


def generate_pairs(config: MultiRewardConfig, prompts: list[str]) -> list[tuple[str, str]]:
    """Stage 1b: two Stable Cascade images per training prompt, from two seeds, as ``images/<i>_<0|1>.png``."""
    pairs = _pair_paths(config, len(prompts))
    flat = [path for pair in pairs for path in pair]
    if all(os.path.exists(p) for p in flat):
        logger.info("Stage 1: the %d image pairs are there, skipping.", len(pairs))
        return pairs
    pipe = _load_pipeline(config)
    seeds = [_seed(config, "pair", i, k) for i in range(len(prompts)) for k in (0, 1)]
    _generate(pipe, config, [p for p in prompts for _ in (0, 1)], seeds, flat, "Stage 1: image pairs", latents=True)
    del pipe
    return pairs


def label_pairs(config: MultiRewardConfig, prompts: list[str], pairs, scorers: Mapping[str, Callable]) -> Any:
    """Stage 2: every pair labelled by every reward (``pairs/``), and the same rows as one user (``pairs_pooled/``).

    Returns:
        The multi-user ``datasets.Dataset`` (rows of reward ``k`` are ``k * len(prompts) ...``).
    """
    import datasets
    from safetensors.torch import load_file

    path, pooled_path = _path(config, "pairs"), _path(config, "pairs_pooled")
    if os.path.exists(path) and os.path.exists(pooled_path):
        logger.info("Stage 2: the labelled pairs are there, skipping.")
        return datasets.load_from_disk(path)
    images_0 = _open_images([p[0] for p in pairs])
    images_1 = _open_images([p[1] for p in pairs])
    scores_0 = _score(scorers, images_0, prompts, config.scoring_batch_size)
    scores_1 = _score(scorers, images_1, prompts, config.scoring_batch_size)

    def png(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def latents(path: str) -> Any:
        return load_file(_latents_path(path))["latents"].numpy()

    first = latents(pairs[0][0])
    # the latents each image was generated from, once per pair, shared by the rewards
    array = datasets.Array3D(shape=first.shape, dtype="float32")
    features = datasets.Features(
        caption=datasets.Value("string"), jpg_0=datasets.Value("binary"), jpg_1=datasets.Value("binary"),
        prompt_index=datasets.Value("int64"), latents_0=array, latents_1=array,
    )  # fmt: skip
    base = datasets.Dataset.from_dict(
        {
            "caption": list(prompts),
            "jpg_0": [png(p[0]) for p in pairs],
            "jpg_1": [png(p[1]) for p in pairs],
            "prompt_index": list(range(len(prompts))),
            "latents_0": [latents(p[0]) for p in pairs],
            "latents_1": [latents(p[1]) for p in pairs],
        },
        features=features,
    )
    per_reward = []
    for name in scorers:
        labels = [pair_label(s0, s1) for s0, s1 in zip(scores_0[name], scores_1[name], strict=True)]
        per_reward.append(
            base.add_column("label_0", labels)
            .add_column("label_1", [1.0 - label for label in labels])
            .add_column("user_id", [name] * len(prompts))
            .add_column("score_0", scores_0[name])
            .add_column("score_1", scores_1[name])
        )
    dataset = datasets.concatenate_datasets(per_reward)
    # for user-free Diffusion-DPO trainers, which read the images
    pooled = dataset.remove_columns(["user_id", "latents_0", "latents_1"])
    pooled = pooled.add_column("user_id", [POOLED_USER] * len(dataset))
    _save_dataset(pooled, pooled_path)
    _save_dataset(dataset, path)
    ties = {name: part["label_0"].count(0.5) for name, part in zip(scorers, per_reward, strict=True)}
    logger.info("Stage 2: %d pairs x %d rewards; ties per reward: %s.", len(prompts), len(scorers), ties)
    return datasets.load_from_disk(path)


def _load_encoder(config: MultiRewardConfig) -> Any:
    from .. import CLIPPreferenceEncoder, PreferenceEncoder

    device = str(_device(config))
    if config.encoder_type == "clip":
        return CLIPPreferenceEncoder.from_pretrained(config.preference_encoder, device_map=device)
    options = {} if config.encoder_layer is None else {"layer": config.encoder_layer}
    dtype = "bfloat16" if _dtype(config) == torch.bfloat16 else "float32"
    return PreferenceEncoder.from_pretrained(config.preference_encoder, dtype=dtype, device_map=device, **options)


def _embedding_files(config: MultiRewardConfig, rewards: Sequence[str]) -> dict[str, str]:
    folder = _path(config, "user_embeddings")
    files = {"ppd": os.path.join(folder, "user_embeddings.safetensors")}
    files["pooled_dpo"] = os.path.join(folder, "constant_all_users.safetensors")
    files.update({f"bound-{r}": os.path.join(folder, f"constant_{r}.safetensors") for r in rewards})
    return files


def compute_user_embeddings(config: MultiRewardConfig, dataset: Any, rewards: Sequence[str]) -> dict[str, str]:
    """Stage 3: each reward-user's embedding from 4 of its pairs, and the constant-user tables of the baselines.

    Writes ``user_embeddings/user_embeddings.safetensors`` (PPD), ``constant_all_users.safetensors`` (pooled
    DPO: PPD's draws, every embedding zero) and ``constant_<reward>.safetensors`` (that reward's draw, zero).

    Returns:
        Training run name -> its user-embedding table.
    """
    from ..embedding_cache import UserEmbeddingCache
    from ..training import encode_user_draws, load_user_embeddings, sample_user_draws, save_user_embeddings

    files = _embedding_files(config, rewards)
    if all(os.path.exists(f) for f in files.values()):
        logger.info("Stage 3: the user embeddings are there, skipping.")
        return files
    folder = _path(config, "user_embeddings")
    if not os.path.exists(files["ppd"]):
        encoder = _load_encoder(config)
        draws, stats = sample_user_draws(dataset, encoder.num_pairs, 1, _seed(config, "draws") % 2**32)
        missing = sorted(set(rewards) - {d.user_id for d in draws})
        if missing:
            raise ValueError(
                f"The rewards {missing} have fewer than {encoder.num_pairs} non-tied pairs for their user embedding: "
                f"raise `num_prompts` (now {config.num_prompts}); pairs per reward: {stats.per_user_pairs}."
            )
        cache = UserEmbeddingCache(os.path.join(folder, "cache"), encoder)
        encoded = encode_user_draws(cache, dataset, draws)
        if encoded.unreadable:
            raise ValueError(f"Unreadable generated images in the user draws: {encoded.unreadable}.")
        metadata = {"encoder_fingerprint": cache.fingerprint, "encoder": encoder.config, "seed": config.seed}
        encoder.save_pretrained(os.path.join(folder, "encoder"))
        save_user_embeddings(files["ppd"], encoded.embeddings, encoded.draws, metadata)
        del encoder
    embeddings, draws, metadata = load_user_embeddings(files["ppd"])
    # the baselines' one constant user: ordinary Diffusion-DPO of the same adapter, no user information
    constant = {"constant_user": "zeros", **metadata}
    save_user_embeddings(files["pooled_dpo"], torch.zeros_like(embeddings), draws, constant)
    for reward in rewards:
        own = [i for i, d in enumerate(draws) if d.user_id == reward]
        save_user_embeddings(files[f"bound-{reward}"], torch.zeros_like(embeddings[own]), [draws[i] for i in own],
                             constant)  # fmt: skip
    return files


def _training_arguments(config: MultiRewardConfig, user_embeddings: str, output_dir: str) -> Any:
    from ..training import PPDTrainingArguments

    return PPDTrainingArguments(
        dataset_name=_path(config, "pairs"),
        user_embeddings=user_embeddings,
        # every reward-user trains: the evaluation is stage 5, on held-out prompts rather than held-out users
        num_validation_users=0,
        eval_user_fraction=0.0,
        pretrained_model_name_or_path=config.pretrained_model_name_or_path,
        prior_subfolder=config.prior_subfolder,
        variant=config.variant,
        resolution=config.resolution,
        resolution_multiple=config.resolution_multiple,
        latent_dim_scale=config.latent_dim_scale,
        num_user_tokens=config.num_user_tokens,
        user_token_dim=config.user_token_dim,
        output_dir=output_dir,
        seed=config.seed,
        train_batch_size=config.train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_train_steps=config.max_train_steps,
        learning_rate=config.learning_rate,
        lr_warmup_steps=config.lr_warmup_steps,
        beta_dpo=config.beta_dpo,
        user_dropout=config.user_dropout,
        prompt_dropout=config.prompt_dropout,
        mixed_precision=config.mixed_precision,
        gradient_checkpointing=config.gradient_checkpointing,
        checkpointing_steps=config.checkpointing_steps,
        resume_from_checkpoint="latest",  # a killed run continues; a fresh folder starts a new one
        report_to=config.report_to,
    )


def train_models(config: MultiRewardConfig, embedding_files: Mapping[str, str]) -> dict[str, dict]:
    """Stage 4: PPD, pooled DPO and the single-reward bounds, each ``max_train_steps`` steps of the same batch.

    Returns:
        Run name -> ``{"adapter": folder, "pair_stats": ..., "final_metrics": ...}`` (``models/<run>/run.json``).
    """
    from ..training import load_user_embeddings, train_ppd

    runs = {}
    for name, user_embeddings in embedding_files.items():
        folder = _path(config, "models", name)
        record_path = os.path.join(folder, "run.json")
        if os.path.exists(record_path) and os.path.exists(os.path.join(folder, ADAPTER_WEIGHTS)):
            logger.info("Stage 4: %s is trained, skipping.", name)
            runs[name] = _read_json(record_path)
            continue
        logger.info("Stage 4: training %s.", name)
        result = train_ppd(_training_arguments(config, user_embeddings, folder))
        users = len({d.user_id for d in load_user_embeddings(user_embeddings)[1]})
        if result.pair_stats["users"] != users:
            raise RuntimeError(
                f"{name} trained on {result.pair_stats['users']} of its {users} users: {result.pair_stats}."
            )
        runs[name] = {
            "adapter": folder,
            "steps": result.global_step,
            "pair_stats": result.pair_stats,
            "final_metrics": result.final_metrics,
        }
        _write_json(record_path, runs[name])
    return runs


def _eval_runs(config: MultiRewardConfig, rewards: Sequence[str]) -> list[tuple[str, str | None, Any]]:
    """(run name, adapter run or ``None``, user: a reward's name, ``"constant"`` or ``None``) of every image set."""
    runs = [("base", None, None), ("pooled_dpo", "pooled_dpo", "constant")]
    runs += [(f"ppd-{r}", "ppd", r) for r in rewards]
    runs += [(f"bound-{r}", f"bound-{r}", "constant") for r in rewards]
    return runs


def evaluate(config: MultiRewardConfig, prompts: list[str], scorers: Mapping[str, Callable]) -> dict[str, dict]:
    """Stage 5a: images of every model on the held-out prompts from the same seeds, scored by every reward.

    Returns:
        Image set (``base``, ``pooled_dpo``, ``ppd-<reward>``, ``bound-<reward>``) -> reward -> scores.
    """
    from ..training import load_user_embeddings

    rewards = list(scorers)
    runs = _eval_runs(config, rewards)
    score_file = {name: _path(config, "eval", "scores", f"{name}.json") for name, _, _ in runs}
    todo = [run for run in runs if not os.path.exists(score_file[run[0]])]
    per_prompt = config.eval_images_per_prompt
    eval_prompts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [_seed(config, "eval", i, k) for i in range(len(prompts)) for k in range(per_prompt)]
    pipe = _load_pipeline(config) if todo else None
    embeddings, draws, _ = load_user_embeddings(_embedding_files(config, rewards)["ppd"])
    for name, adapter, user in todo:
        if adapter is None:
            pipe.unload_user_adapter()
            user_embeds = None
        else:
            pipe.load_user_adapter(_path(config, "models", adapter))
            if user == "constant":
                user_embeds = torch.zeros_like(embeddings[:1])
            else:
                user_embeds = embeddings[[i for i, d in enumerate(draws) if d.user_id == user][:1]]
        paths = [_path(config, "eval", "images", name, f"{i:06d}.png") for i in range(len(eval_prompts))]
        _generate(pipe, config, eval_prompts, seeds, paths, f"Stage 5: {name}", user_embeds)
        scores = _score(scorers, _open_images(paths), eval_prompts, config.scoring_batch_size)
        _write_json(score_file[name], {"prompts": eval_prompts, "scores": scores})
    return {name: _read_json(score_file[name])["scores"] for name, _, _ in runs}


def reproduce_multi_reward(
    config: MultiRewardConfig, scorers: Mapping[str, Callable[..., torch.Tensor]] | None = None
) -> dict[str, Any]:
    """Runs (or resumes) the whole multi-reward experiment; writes ``results.json``, ``results.md``, ``results.png``.

    Args:
        config: The settings (see ``MultiRewardConfig`` and the module docstring for the stages).
        scorers: Reward name -> scorer (``scorer(images, prompts)`` -> float tensor ``(N,)``), one user each, in
            the table's order; by default built from ``config.rewards`` and ``config.reward_model_paths``.

    Returns:
        What ``results.json`` holds: ``table`` (reward -> ``base``, ``bound``, ``pooled_dpo``, ``ppd``,
        ``share_of_bound`` in %), ``ppd_cross_rewards`` (PPD reward-user -> every reward's mean), ``scores`` (image
        set -> reward -> per-image scores), ``budget``, ``training_pairs`` and ``config``.

    Raises:
        ValueError: ``scorers`` and ``config.rewards`` disagree, there are too few prompts, a reward-user has
            fewer than 4 non-tied pairs, or ``output_dir`` holds a run made with settings that change the results.

    Examples:
        ```py
        from ppd_diffusers.evaluation import load_scorer
        from ppd_diffusers.evaluation.multi_reward import MultiRewardConfig, reproduce_multi_reward

        config = MultiRewardConfig(rewards=["clip_score", "aesthetic"], mixed_precision="bf16")
        scorers = {name: load_scorer(name, device="cuda") for name in config.rewards}
        table = reproduce_multi_reward(config, scorers)["table"]  # killed? run it again: it resumes
        ```
    """
    if scorers is None:
        options = parse_reward_model_paths(config.reward_model_paths)
        scorers = load_reward_scorers(config.rewards, options, device=_device(config), show_progress=False)
    rewards = list(scorers)
    if rewards != list(config.rewards):
        raise ValueError(f"`scorers` are {rewards} but `config.rewards` is {config.rewards}: give the same, in order.")
    _check_settings(config)
    split = split_prompts(config)
    pairs = generate_pairs(config, split["train"])
    dataset = label_pairs(config, split["train"], pairs, scorers)
    embedding_files = compute_user_embeddings(config, dataset, rewards)
    runs = train_models(config, embedding_files)
    scores = evaluate(config, split["eval"], scorers)

    results = {
        "table": results_table(scores, rewards),
        "ppd_cross_rewards": {u: {r: _mean(scores[f"ppd-{u}"][r]) for r in rewards} for u in rewards},
        "eval_images": len(split["eval"]) * config.eval_images_per_prompt,
        "budget": {"steps": config.max_train_steps, "pairs_per_step": config.pairs_per_step},
        "training_pairs": {name: run["pair_stats"] for name, run in runs.items()},
        "scores": scores,
        "config": asdict(config),
    }
    _write_json(_path(config, "results.json"), results)
    with open(_path(config, "results.md"), "w") as f:
        f.write(results_markdown(results))
    try:
        results_figure(results).savefig(_path(config, "results.png"), dpi=120)
    except ImportError:
        logger.warning("No `results.png`: the figure needs matplotlib (`pip install ppd-diffusers[eval]`).")
    logger.info("Wrote %s:\n%s", _path(config, "results.md"), results_markdown(results))
    return results
