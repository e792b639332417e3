"""The model card of a trained adapter (base model, data, hyperparameters, metrics) and its upload to the Hub."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from .arguments import PPDTrainingArguments
from .held_out import HELD_OUT_FILE, HeldOutSplit
from .pairs_dataset import PairStats

__all__ = ["adapter_model_card"]

HYPERPARAMETERS = (
    "backbone", "learning_rate", "lr_scheduler", "lr_warmup_steps", "train_batch_size", "gradient_accumulation_steps",
    "beta_dpo", "timestep_weighting", "user_dropout", "prompt_dropout", "max_grad_norm", "adam_weight_decay",
    "mixed_precision", "gradient_checkpointing", "resolution", "seed",
)  # fmt: skip
FLUX_HYPERPARAMETERS = ("weighting_scheme", "flux_guidance_scale")

# per backbone: its name, Hub tag, what the adapter personalizes, the objective, the pipeline class
_BACKBONES = {
    "stable_cascade": dict(
        name="Stable Cascade",
        tag="stable-cascade",
        layers="decoupled user cross-attention for Stage C",
        objective="the user-conditioned Diffusion-DPO loss of PPD",
        pipeline="PersonalizedStableCascadePipeline",
    ),
    "sdxl": dict(
        name="SDXL",
        tag="stable-diffusion-xl",
        layers="decoupled user cross-attention beside every cross-attention layer of the UNet",
        objective="the user-conditioned Diffusion-DPO loss of PPD",
        pipeline="PersonalizedStableDiffusionXLPipeline",
    ),
    "flux": dict(
        name="Flux",
        tag="flux",
        layers="user attention for the image stream of every double-stream block of the transformer",
        objective=(
            "the user-conditioned DPO loss of PPD on the flow-matching velocity (Flow-DPO, "
            "[arXiv 2501.13918](https://arxiv.org/abs/2501.13918))"
        ),
        pipeline="PersonalizedFluxPipeline",
    ),
}


def adapter_model_card(
    args: PPDTrainingArguments,
    adapter_config: Any,
    pair_stats: PairStats,
    metrics: dict[str, float],
    global_step: int,
    effective_batch: int,
    embedding_metadata: dict[str, Any] | None = None,
    skipped_rows: int = 0,
    repo_id: str | None = None,
    held_out: HeldOutSplit | None = None,
) -> Any:
    """A ``huggingface_hub.ModelCard`` describing a PPD adapter and how it was trained.

    Args:
        args: The training settings.
        adapter_config: The trained adapter's config (its token count and width are read from here).
        pair_stats: How the data's rows were used.
        metrics: Metrics of the last training step.
        global_step: Optimizer steps taken.
        effective_batch: Pairs per optimizer step (batch x accumulation x processes).
        embedding_metadata: Metadata of the user-embedding table (its encoder).
        skipped_rows: Reads of unreadable rows during training.
        repo_id: The Hub repo the adapter goes to (for the usage snippet); by default ``hub_model_id`` or the
            output folder's name.
        held_out: The users held out of training; the card names their counts and ``held_out_users.json``.

    Returns:
        The card; ``card.save(path)`` writes it, ``card.push_to_hub(repo_id)`` uploads it.

    Examples:
        ```py
        card = adapter_model_card(args, adapter.config, dataset.stats, {"loss": 0.61}, 1000, 768)
        card.save("ppd-adapter/README.md")
        ```
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = args.pretrained_model_name_or_path
    backbone = _BACKBONES[args.backbone]
    data = ModelCardData(
        library_name="ppd-diffusers",
        base_model=base if not os.path.isdir(base) else None,
        datasets=[args.dataset_name] if not os.path.exists(args.dataset_name) else None,
        tags=["ppd", backbone["tag"], "diffusion-dpo", "personalization", "text-to-image"],
        license="other",
    )
    names = HYPERPARAMETERS + (FLUX_HYPERPARAMETERS if args.backbone == "flux" else ())
    rows = [(name, getattr(args, name)) for name in names]
    rows += [(name, adapter_config[name]) for name in ("user_embed_dim", "num_user_tokens", "user_token_dim")]
    hyperparameters = "\n".join(f"| `{name}` | {value} |" for name, value in rows)
    metric_rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items())
    encoder = (embedding_metadata or {}).get("encoder")
    encoder_text = f"```json\n{json.dumps(encoder, indent=2, default=str)}\n```" if encoder else "not recorded"
    stats = asdict(pair_stats)
    repo_id = repo_id or args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    leakage_keys = "row, caption and image uid" if stats["compared_image_uids"] else "row and caption (no image uids)"
    content = f"""---
{data.to_yaml()}
---

# PPD user adapter for {backbone["name"]}

A `UserAdapter` ({backbone["layers"]}, {_base_model_text(args)}) trained with
{backbone["objective"]} ([arXiv 2501.06655](https://arxiv.org/abs/2501.06655)) by
[ppd-diffusers](https://github.com/ppd-diffusers/ppd-diffusers).

```py
import torch
from ppd_diffusers import {backbone["pipeline"]}

{_usage(args, repo_id, backbone["pipeline"])}
image = pipe("a lighthouse at dusk", preference_pairs=pairs).images[0]  # 4 (prompt, preferred, rejected)
```

## Training data

`{args.dataset_name}` (split `{args.dataset_split}`): {stats["pairs"]} training pairs of {stats["users"]} users.
Left out: {stats["ties"]} ties, {stats["rows_without_user_embedding"]} rows of users without an embedding,
{stats["held_out_rows"]} rows of held-out users, {stats["profile_rows"]} rows that built their user's embedding and
{stats["leaking_rows"]} rows sharing a prompt or an image with it (compared by {leakage_keys}); unreadable
images were met {skipped_rows} times and passed over. User embeddings: `{args.user_embeddings}`, from the
preference encoder

{encoder_text}
{_held_out_section(held_out, repo_id)}
## Training

{global_step} optimizer steps of {effective_batch} pairs (`train_batch_size` x accumulation x processes).

| hyperparameter | value |
|---|---|
{hyperparameters}

## Metrics at the last step

| metric | value |
|---|---|
{metric_rows}
"""
    return ModelCard(content)


def _base_model_text(args: PPDTrainingArguments) -> str:
    base = args.pretrained_model_name_or_path
    if args.backbone == "stable_cascade":
        return f"`{args.prior_subfolder}` of `{base}`"
    return f"base model `{base}`"


def _usage(args: PPDTrainingArguments, repo_id: str, pipeline: str) -> str:
    base = args.pretrained_model_name_or_path
    if args.backbone == "stable_cascade":
        return f"""pipe = {pipeline}.from_stable_cascade(
    "{repo_id}", "<the preference encoder below>",
    prior_model_name_or_path="{base}", prior_subfolder="{args.prior_subfolder}", torch_dtype=torch.bfloat16,
).to("cuda")"""
    return f"""pipe = {pipeline}.from_base_model(
    "{base}", "{repo_id}", "<the preference encoder below>", torch_dtype=torch.bfloat16
).to("cuda")"""


def _held_out_section(held_out: HeldOutSplit | None, repo_id: str) -> str:
    if held_out is None:
        return ""
    return f"""
## Held-out users

{len(held_out.evaluation_users)} users were held out for evaluation and {len(held_out.validation_users)} for the
validation images (chosen among {held_out.candidate_users} users with an embedding by a hash of the user id, seed
{held_out.seed}); training read none of their pairs. They are listed, with their row counts, in
[`{HELD_OUT_FILE}`]({HELD_OUT_FILE}). Evaluate this adapter on the evaluation users only: every other user of the
data may have trained it.

```py
from ppd_diffusers.training import load_held_out_split

users = load_held_out_split("{repo_id}").evaluation_users
```
"""


def create_hub_repo(args: PPDTrainingArguments) -> str:
    """Creates (or finds) the Hub repo of ``hub_model_id`` (default: the output folder's name); its full id."""
    from huggingface_hub import create_repo

    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    return create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id


def upload_adapter(args: PPDTrainingArguments, repo_id: str) -> None:
    """Uploads ``output_dir``: the adapter, its model card and the validation grids (not checkpoints or logs)."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        token=args.hub_token,
        commit_message="PPD user adapter",
        ignore_patterns=["checkpoint-*", "logs/*", "*.tmp/*"],
    )
