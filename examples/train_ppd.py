r"""Train a PPD user adapter for Stable Cascade, SDXL or Flux on Pick-a-Pic-format preference data.

    python examples/train_ppd.py --dataset_name pickapic-latents \
        --user_embeddings user_embeddings/user_embeddings.safetensors \
        --mixed_precision bf16 --gradient_checkpointing --train_batch_size 16 --gradient_accumulation_steps 6 \
        --decoder_model_name_or_path stabilityai/stable-cascade --output_dir ppd-adapter
    python examples/train_ppd.py --backbone sdxl --dataset_name yuvalkirstain/pickapic_v2 \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --user_embeddings user_embeddings/user_embeddings.safetensors \
        --mixed_precision bf16 --gradient_checkpointing --output_dir ppd-sdxl-adapter  # --backbone flux likewise
    accelerate launch --multi_gpu --num_processes 8 examples/train_ppd.py ...  # 8 x 16 x 6 = 768 pairs per step
    accelerate launch --config_file fsdp.yaml examples/train_ppd.py ...        # FSDP / DeepSpeed: accelerate config

`--backbone` (default `stable_cascade`) picks the base model and its DPO objective: Diffusion-DPO on Stage C's or
SDXL's noise (or v) prediction, Flow-DPO on Flux's velocity. Resume after a kill with
`--resume_from_checkpoint latest`. `--help` lists every setting; the training guide (docs/guides/training.md)
walks through data preparation, user embeddings, latents and training.
"""

import logging

from ppd_diffusers.training import PPDTrainingArguments, TrainingResult, train_ppd


def main() -> TrainingResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = PPDTrainingArguments.argument_parser(__doc__)
    (args,) = parser.parse_args_into_dataclasses()
    return train_ppd(args)


if __name__ == "__main__":
    main()
