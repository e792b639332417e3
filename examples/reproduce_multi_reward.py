r"""The paper's multi-reward experiment in one command: each reward model is one user.

    python examples/reproduce_multi_reward.py --output_dir multi-reward --rewards clip_score aesthetic hps \
        --prompts_file pickapic_prompts.txt --num_prompts 5000 --num_eval_prompts 500 \
        --mixed_precision bf16 --gradient_checkpointing --max_train_steps 2000 --train_batch_size 16
    python examples/reproduce_multi_reward.py ... --reward_model_paths hps=/ckpt/hps-v2.1 \
        aesthetic=./aesthetic-head aesthetic.clip_name_or_path=./clip-vit-large-patch14  # local checkpoints

Stages: Stable Cascade image pairs for the training prompts; every pair labelled by every reward (a
Pick-a-Pic-format dataset whose users are the rewards); each reward-user's embedding from 4 pairs; PPD, pooled
Diffusion-DPO and each single-reward DPO bound trained with the same steps and pairs per step; every model
evaluated on held-out prompts from the same seeds. Each stage is skipped when its output is in `--output_dir`,
so re-running the same command after a kill resumes it. Writes `results.json`, `results.md` (the paper's table)
and `results.png`. A prompts file is one prompt a line (or a JSON list); Pick-a-Pic's captions, e.g.:

    python -c "import datasets; d = datasets.load_dataset('yuvalkirstain/pickapic_v2_no_images', split='train'); \
        open('pickapic_prompts.txt', 'w').write('\n'.join(sorted(set(d['caption']))))"

Compute: ~8-11 H200 GPU hours at the scale above (an estimate; see `ppd_diffusers.evaluation.multi_reward`).
`--help` lists every setting; docs/guides/evaluation.md explains the table.
"""

import argparse
import logging

from ppd_diffusers.evaluation.multi_reward import MultiRewardConfig, reproduce_multi_reward


def main() -> dict:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = HfArgumentParser(
        MultiRewardConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    (config,) = parser.parse_args_into_dataclasses()
    return reproduce_multi_reward(config)  # the scorers come from --rewards and --reward_model_paths


if __name__ == "__main__":
    main()
