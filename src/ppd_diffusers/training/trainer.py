"""``train_ppd``: the multi-user PPD training run behind ``examples/train_ppd.py``, on one device or many.

accelerate supplies the devices, DDP/FSDP/DeepSpeed, mixed precision, gradient accumulation, trackers and the
resumable checkpoints; this module supplies PPD: a frozen base model in ``eval()`` (Stable Cascade's Stage C, SDXL's
UNet or Flux's transformer, see ``backbone_training``), one trainable ``UserAdapter``, Pick-a-Pic pairs joined with
their users' embeddings, and the user-conditioned Diffusion-DPO step of the backbone's objective.

Exact resume: a checkpoint holds the adapter, optimizer, learning-rate schedule and the step; the data order
is a function of the seed and the epoch (accelerate's seedable sampler), the position is restored by skipping
the batches already seen, and each batch's noise, timesteps and dropout come from a generator seeded by
``(seed, epoch, batch, process)``, so no random state has to survive the kill.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..loss import PPDLoss
from .arguments import PPDTrainingArguments
from .backbone_training import BackboneTraining, backbone_training
from .checkpoints import (
    changed_settings,
    last_metrics,
    prepare_output_dir,
    resolve_resume,
    save_checkpoint,
    step_of,
)
from .dpo_step import ppd_dpo_step
from .held_out import HELD_OUT_FILE, HeldOutSplit, load_held_out_split, make_held_out_split
from .pairs_dataset import PreferencePairsDataset, collate_preference_pairs
from .pickapic import load_pickapic_dataset, stable_seed
from .user_embeddings import load_user_embeddings

__all__ = ["TrainingResult", "train_ppd"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# settings a resumed run may change without changing what it trains (outputs, logging, validation, Hub)
SETTINGS_NOT_CHANGING_TRAINING = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "report_to", "tracker_project_name", "validation_steps", "validation_prompts", "validation_inference_steps",
    "validation_guidance_scale", "decoder_model_name_or_path", "dataloader_num_workers", "push_to_hub",
    "hub_model_id",
}  # fmt: skip


@dataclass
class TrainingResult:
    """What ``train_ppd`` did.

    Args:
        global_step: Optimizer steps taken, counting those before a resume.
        adapter_path: Folder of the saved adapter (``output_dir``), loadable by ``load_user_adapter``.
        pair_stats: How the dataset's rows were sorted (see ``PairStats``), as a dict.
        skipped_rows: Reads of rows with an unreadable image during this run (passed over), summed over processes.
        final_metrics: Metrics of the last step (``loss``, ``implicit_accuracy``, ``lr``...).
        adapter: The trained adapter (fp32, unwrapped); on the main process exactly the saved weights.
        held_out: The users held out of training (evaluation and validation), as written to
            ``output_dir/held_out_users.json``.

    Examples:
        ```py
        result = train_ppd(args)
        result.global_step, result.final_metrics["loss"], result.pair_stats["pairs"]
        ```
    """

    global_step: int
    adapter_path: str
    pair_stats: dict[str, int]
    skipped_rows: int = 0
    final_metrics: dict[str, float] = field(default_factory=dict)
    adapter: Any = field(default=None, repr=False)
    held_out: HeldOutSplit | None = field(default=None, repr=False)


def _held_out_split(args: PPDTrainingArguments, dataset: Any, draws: list, checkpoint: str | None) -> HeldOutSplit:
    """The run's held-out users; a resumed run keeps those its checkpoint's run recorded, whatever the settings."""
    recorded_as = dict(dataset_name=args.dataset_name, dataset_split=args.dataset_split,
                       user_embeddings=args.user_embeddings)  # fmt: skip
    split = make_held_out_split(
        dataset, draws, num_validation_users=args.num_validation_users, eval_user_fraction=args.eval_user_fraction,
        max_eval_users=args.max_eval_users, seed=args.held_out_seed, **recorded_as,
    )  # fmt: skip
    if checkpoint is None:
        return split
    recorded = os.path.join(os.path.dirname(os.path.normpath(checkpoint)), HELD_OUT_FILE)
    if not os.path.isfile(recorded):
        # a run of a version that held out validation users only (chosen with `seed`) may have trained on anyone
        logger.warning(
            "%s has no %s (an older run): resuming holds out no evaluation users, since the run may have trained on "
            "any of them, and the validation users that version chose.", os.path.dirname(recorded), HELD_OUT_FILE,
        )  # fmt: skip
        return make_held_out_split(
            dataset, draws, args.num_validation_users, eval_user_fraction=0.0, seed=args.seed, **recorded_as
        )
    saved = load_held_out_split(recorded)
    if (saved.evaluation_users, saved.validation_users) != (split.evaluation_users, split.validation_users):
        # users the run trained on before the checkpoint must not become evaluation users now
        logger.warning(
            "Resuming keeps the held-out users recorded in %s (%d evaluation, %d validation); the current settings "
            "would hold out others (%d evaluation, %d validation). Train into a new `output_dir` to change them.",
            recorded, len(saved.evaluation_users), len(saved.validation_users), len(split.evaluation_users),
            len(split.validation_users),
        )  # fmt: skip
    return saved


def _optimizer(adapter: torch.nn.Module, args: PPDTrainingArguments) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        adapter.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def _train_batch(batch, base: BackboneTraining, model, loss_fn, args, generator, weight_dtype):
    """The PPD loss of one batch: latents (stored or encoded now), prompts with dropout, the DPO step."""
    device = generator.device
    with torch.no_grad():
        chosen, rejected = base.latents(batch, generator)
    pairs = chosen.shape[0]
    drop = torch.rand(pairs, generator=generator, device=device) < args.prompt_dropout
    captions = ["" if dropped else caption for dropped, caption in zip(drop.tolist(), batch["caption"], strict=True)]
    with torch.no_grad():
        conditioning = base.conditioning(captions, device)
    return ppd_dpo_step(
        model,
        chosen.to(device, weight_dtype),
        rejected.to(device, weight_dtype),
        user_embeds=batch["user_embeds"].to(device),  # the fp32 adapter reads them; autocast picks the precision
        conditioning=conditioning,
        objective=base.objective,
        loss_fn=loss_fn,
        user_dropout=args.user_dropout,
        timestep_weighting=args.timestep_weighting,
        generator=generator,
    )


def _optimizer_step(accelerator, batch, base, model, loss_fn, adapter, optimizer, lr_scheduler, args, generator,
                    weight_dtype):  # fmt: skip
    """One micro-batch inside ``accumulate``: loss, backward and, at the end of an accumulation, clip and step."""
    with accelerator.accumulate(adapter), accelerator.autocast():
        out = _train_batch(batch, base, model, loss_fn, args, generator, weight_dtype)
        accelerator.backward(out.loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(adapter.parameters(), args.max_grad_norm)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out


def train_ppd(args: PPDTrainingArguments) -> TrainingResult:
    """Trains a ``UserAdapter`` for many users at once with the user-conditioned Diffusion-DPO loss.

    ``args.backbone`` picks the base model: Stable Cascade's Stage C, SDXL or Flux, each with its latents and
    ``DPOObjective`` (see ``backbone_training`` and ``objectives``). Run it under ``accelerate launch`` for several
    GPUs or nodes (DDP, FSDP or DeepSpeed come from the accelerate config). Only the adapter is trained, prepared and
    checkpointed; the base model and the encoders stay frozen in ``eval()`` and, with ``mixed_precision="bf16"``,
    are stored in bf16 while the adapter keeps fp32 weights. Writes to ``args.output_dir``: the adapter
    (``save_pretrained``, loadable by the backbone's pipeline's ``load_user_adapter``), a model card ``README.md``
    naming the backbone and base model, ``checkpoint-N``
    folders, ``logs/metrics.jsonl`` (one line per step) and ``validation/step-N.png`` grids (rows: prompts;
    columns: the base model, then each validation user) and ``held_out_users.json``, the users held out of
    training (see ``HeldOutSplit``; evaluate the adapter on its ``evaluation_users`` only).

    Args:
        args: The settings (see ``PPDTrainingArguments``).

    Returns:
        A ``TrainingResult``.

    Examples:
        ```py
        from ppd_diffusers.training import PPDTrainingArguments, train_ppd

        result = train_ppd(PPDTrainingArguments(
            dataset_name="pickapic-latents", user_embeddings="user_embeddings/user_embeddings.safetensors",
            mixed_precision="bf16", gradient_checkpointing=True, max_train_steps=1000,
        ))
        ```
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..adapter import UserAdapter
    from ..personalized_model import PersonalizedModel
    from .model_card import adapter_model_card, create_hub_repo, upload_adapter
    from .validation import gather_adapter, log_validation

    logging_dir = os.path.join(args.output_dir, "logs")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # the sampler's permutation depends on the seed and the epoch only: resumable
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)  # the same fresh adapter in every process (DDP also broadcasts it)
    if accelerator.mixed_precision == "fp16":
        raise ValueError(
            "fp16 is not supported (it gives black Stable Cascade images): use `--mixed_precision bf16` or `no`."
        )
    weight_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    checkpoint = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    repo_id = None
    if accelerator.is_main_process:
        resuming = args.resume_from_checkpoint == "latest"
        metrics_file = os.path.join(logging_dir, METRICS_FILE)
        prepare_output_dir(args.output_dir, checkpoint, metrics_file, args.overwrite_output_dir, resuming)
        os.makedirs(logging_dir, exist_ok=True)
        # before training, so that a missing login fails now rather than after the run
        repo_id = create_hub_repo(args) if args.push_to_hub else None
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- data (first: cheap checks before big models)
    user_embeddings, draws, embedding_metadata = load_user_embeddings(args.user_embeddings)
    with accelerator.main_process_first():  # one download or cache build, then the others read it
        dataset = load_pickapic_dataset(args.dataset_name, args.dataset_split)
    # held out whether or not grids are drawn, so the training pairs never depend on the validation settings
    split = _held_out_split(args, dataset, draws, checkpoint)
    held_out = split.validation_users
    accelerator.wait_for_everyone()  # every process has read a recorded split before it is written again
    if accelerator.is_main_process:
        split.save(os.path.join(args.output_dir, HELD_OUT_FILE))
    base = backbone_training(args, weight_dtype)
    dataset = base.training_dataset(dataset)
    pairs = PreferencePairsDataset(
        dataset, user_embeddings, draws, image_transform=base.image_transform(dataset), exclude_users=split.users,
        seed=args.seed,
    )  # fmt: skip
    if len(pairs) == 0:
        raise ValueError(f"No training pairs in `{args.dataset_name}`: {pairs.stats}.")
    base.check_latent_size(pairs)
    train_set: torch.utils.data.Dataset = pairs
    stats = pairs.stats
    if args.max_train_samples is not None and args.max_train_samples < len(pairs):
        chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))
        train_set = torch.utils.data.Subset(pairs, chosen[: args.max_train_samples].tolist())
        stats = replace(stats, pairs=len(train_set), users=len(set(pairs.users_of(train_set.indices))))

    # ---------------------------------------------------------------- models
    # Stable Cascade's Stage B and A only make the validation images, which the main process draws
    validating = args.num_validation_users > 0 and (
        args.backbone != "stable_cascade" or args.decoder_model_name_or_path is not None
    )
    base.load(load_decoder=validating and accelerator.is_main_process).to(accelerator.device)
    denoiser = base.denoiser
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    if args.torch_compile:
        base.compile()

    if args.adapter_name_or_path is not None:
        adapter = UserAdapter.from_pretrained(args.adapter_name_or_path)
        adapter.check_model(denoiser)
        adapter = adapter.to(accelerator.device, torch.float32)
    else:
        adapter = UserAdapter.from_model(
            denoiser,
            user_embed_dim=user_embeddings.shape[-1],
            num_user_tokens=args.num_user_tokens,
            user_token_dim=args.user_token_dim,
        )
    if adapter.config.user_embed_dim != user_embeddings.shape[-1]:
        raise ValueError(
            f"The adapter takes user embeddings of width {adapter.config.user_embed_dim}, but "
            f"`user_embeddings` holds width {user_embeddings.shape[-1]}."
        )
    adapter.train()
    if not pairs.precomputed_latents:
        base.prepare_image_encoder(accelerator.device)

    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=collate_preference_pairs,
        num_workers=args.dataloader_num_workers,
        drop_last=True,  # every process and step sees full batches
    )

    # ---------------------------------------------------------------- optimisation
    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP replaces the parameters: the optimizer must be built on the wrapped ones
        adapter = accelerator.prepare(adapter)
        optimizer, loader = accelerator.prepare(_optimizer(adapter, args), loader)
    else:  # DeepSpeed needs the model and its optimizer in one call
        adapter, optimizer, loader = accelerator.prepare(adapter, _optimizer(adapter, args), loader)
    if len(loader) == 0:
        raise ValueError(
            f"{len(train_set)} training pairs make no full batch of {args.train_batch_size} pairs in each of "
            f"{accelerator.num_processes} processes: lower `train_batch_size`."
        )
    # DeepSpeed's config may override the argument: the accelerator holds the value in force
    accumulation = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(loader) / accumulation)  # per process
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # a prepared scheduler steps once per process at every optimizer step
    lr_scheduler = accelerator.prepare(
        get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
    )
    model = PersonalizedModel.for_model(denoiser, adapter)
    loss_fn = PPDLoss(beta=args.beta_dpo)

    # never the Hub token: trackers store (and wandb uploads) their config, and checkpoints keep it
    settings = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in asdict(args).items()}
    settings.pop("hub_token")
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=settings)
        logger.info(
            "%d training pairs of %d users (%s); %d evaluation and %d validation users held out (%s); %d steps of "
            "%d pairs (%d per process x %d accumulation x %d processes).",
            len(train_set), stats.users, stats, len(split.evaluation_users), len(split.validation_users),
            HELD_OUT_FILE, max_train_steps,
            args.train_batch_size * accumulation * accelerator.num_processes,
            args.train_batch_size, accumulation, accelerator.num_processes,
        )  # fmt: skip

    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        global_step = step_of(checkpoint)
        logger.info("Resumed from %s (step %d).", checkpoint, global_step)
        changed = changed_settings(checkpoint, settings, SETTINGS_NOT_CHANGING_TRAINING)
        if changed:
            logger.warning(
                "Resuming with settings that differ from the checkpoint's: %s. The result will differ from an "
                "uninterrupted run's.",
                "; ".join(f"`{name}` {saved!r} -> {now!r}" for name, (saved, now) in sorted(changed.items())),
            )
    first_epoch = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * accumulation

    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    skipped_rows, running = 0, []
    metrics = last_metrics(os.path.join(logging_dir, METRICS_FILE)) if checkpoint is not None else {}
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        loader.set_epoch(epoch)
        epoch_loader = loader
        if epoch == first_epoch and batches_to_skip:
            epoch_loader = accelerator.skip_first_batches(loader, batches_to_skip)
        for batch_index, batch in enumerate(epoch_loader, start=batches_to_skip if epoch == first_epoch else 0):
            generator = torch.Generator(accelerator.device)
            generator.manual_seed(stable_seed(args.seed, epoch, batch_index, accelerator.process_index))
            out = _optimizer_step(
                accelerator, batch, base, model, loss_fn, adapter, optimizer, lr_scheduler, args, generator,
                weight_dtype,
            )  # fmt: skip
            running.append(torch.stack([out.loss.detach().float(), out.implicit_accuracy.detach().float()]))
            skipped_rows += batch["skipped"]
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            mean = accelerator.reduce(torch.stack(running).mean(0), reduction="mean")
            running = []
            metrics = {
                "loss": mean[0].item(),
                "implicit_accuracy": mean[1].item(),
                "lr": lr_scheduler.get_last_lr()[0],
                "epoch": epoch,
            }
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['implicit_accuracy']:.2f}")
            accelerator.log(metrics, step=global_step)
            if accelerator.is_main_process:
                with open(os.path.join(logging_dir, METRICS_FILE), "a") as f:
                    f.write(json.dumps({"step": global_step, **metrics}) + "\n")
            if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, settings)
            if validating and (global_step % args.validation_steps == 0 or global_step == max_train_steps):
                log_validation(accelerator, base.pipe, adapter, user_embeddings, draws, held_out, args, global_step)
                # unloading the pipeline's copy of the adapter takes the user processors of SDXL/Flux out
                model = PersonalizedModel.for_model(denoiser, adapter)
            if global_step >= max_train_steps:
                break
    progress.close()

    skipped_rows = int(accelerator.reduce(torch.tensor(skipped_rows, device=accelerator.device), "sum").item())
    accelerator.wait_for_everyone()
    trained = gather_adapter(accelerator, adapter)
    if accelerator.is_main_process:
        trained.save_pretrained(args.output_dir)
        effective_batch = args.train_batch_size * accumulation * accelerator.num_processes
        card = adapter_model_card(
            args, trained.config, stats, metrics, global_step, effective_batch, embedding_metadata,
            skipped_rows, repo_id, held_out=split,
        )  # fmt: skip
        card.save(os.path.join(args.output_dir, "README.md"))
        if repo_id is not None:
            upload_adapter(args, repo_id)
            logger.info("Uploaded the adapter to https://huggingface.co/%s", repo_id)
        logger.info("Saved the adapter to %s; unreadable images met %d times.", args.output_dir, skipped_rows)
    accelerator.end_training()
    return TrainingResult(
        global_step=global_step,
        adapter_path=args.output_dir,
        pair_stats=asdict(stats),
        skipped_rows=skipped_rows,
        final_metrics=metrics,
        adapter=trained,
        held_out=split,
    )
