r"""Evaluate a trained PPD adapter on held-out Pick-a-Pic users: base against personalized images, judged.

    python examples/evaluate_ppd.py --adapter ppd-adapter --encoder ppd-encoder \
        --dataset_name yuvalkirstain/pickapic_v2 --dataset_split train \
        --scorers clip_score aesthetic hps pickscore --vlm_judge llava-hf/llava-onevision-qwen2-7b-ov-hf \
        --max_users 100 --max_prompts 4 --output_dir ppd-evaluation
    accelerate launch --num_processes 8 examples/evaluate_ppd.py ...  # users shared between the GPUs

The users are the training run's evaluation split (`held_out_users.json` in the adapter folder, written by
`train_ppd`; `--held_out_users` points elsewhere); their profile pairs build the embeddings and their other
prompts are generated. A killed run continues where it stopped when started again with the same settings.
Writes `report.json`, `report.md`, `win_rates.png`, `rewards.png`, `grids/` and every image; see
docs/guides/evaluation.md for what each judge measures.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta

from _pipeline_args import add_pipeline_args, generation_kwargs, load_pipeline

from ppd_diffusers.evaluation import (
    build_judges,
    evaluate_personalization,
    load_reward_scorers,
    parse_reward_model_paths,
    plan_evaluation_users,
    write_evaluation_report,
)
from ppd_diffusers.evaluation.records import check_settings
from ppd_diffusers.training import load_held_out_split, load_pickapic_dataset, load_user_embeddings

logger = logging.getLogger("evaluate_ppd")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("users")
    data.add_argument("--dataset_name", required=True, help="the Pick-a-Pic-format data the adapter trained on")
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--held_out_users", help="held_out_users.json (default: the one in the --adapter folder)")
    data.add_argument(
        "--all_users_are_held_out", action="store_true", help="evaluate every user of a split training never read"
    )
    data.add_argument("--num_profile_pairs", type=int, default=4, help="pairs that build each user's embedding")
    data.add_argument(
        "--user_embeddings", help="the training run's user_embeddings.safetensors: its first draw of each user is used"
    )
    data.add_argument("--profile_seed", type=int, default=0, help="else draw profiles with this seed")
    data.add_argument("--max_users", type=int)
    data.add_argument("--max_prompts", type=int, default=4, help="prompts per user")
    judging = parser.add_argument_group("judges")
    judging.add_argument("--scorers", nargs="*", default=["clip_score", "aesthetic", "hps", "pickscore"])
    judging.add_argument(
        "--reward_model_paths", nargs="*", default=[], metavar="NAME=PATH",
        help="checkpoints other than the Hub defaults; NAME.OPTION=VALUE sets another from_pretrained argument "
        "(e.g. aesthetic.clip_name_or_path=./clip)",
    )  # fmt: skip
    judging.add_argument("--held_out_pairs_judge", action="store_true", help="judge by the user's held-out pairs")
    judging.add_argument("--vlm_judge", help="a LLaVA-OneVision id or folder that judges for the user")
    judging.add_argument("--max_judge_pairs", type=int, default=16, help="held-out pairs read per user")
    parser.add_argument("--prompts_per_batch", type=int, default=4)
    parser.add_argument("--output_dir", default="ppd-evaluation")
    add_pipeline_args(parser)
    args = parser.parse_args()
    if not args.pipeline and not args.adapter:
        parser.error("give the adapter to evaluate: --adapter (with --encoder) or a saved --pipeline")
    if not args.scorers and not args.held_out_pairs_judge and not args.vlm_judge:
        parser.error("nothing judges: give --scorers, --held_out_pairs_judge or --vlm_judge")
    if args.held_out_pairs_judge and not args.scorers:
        parser.error("--held_out_pairs_judge judges with the --scorers: give at least one")
    return args


def held_out_users(args: argparse.Namespace) -> list | None:
    if args.all_users_are_held_out:
        return None
    path = args.held_out_users or args.adapter
    if not path:
        raise SystemExit(
            "Which users were held out? Give --held_out_users (the training run's held_out_users.json), or "
            "--all_users_are_held_out for a dataset split the adapter never trained on."
        )
    split = load_held_out_split(path)
    if (split.dataset, split.dataset_split) != (args.dataset_name, args.dataset_split):
        logger.warning(
            "The held-out users were chosen on %s (split %s), and this evaluation reads %s (split %s): make sure "
            "it is the same data, or the users' rows are others.", split.dataset, split.dataset_split,
            args.dataset_name, args.dataset_split,
        )  # fmt: skip
    return split.evaluation_users


def first_draws(path: str | None) -> tuple[dict | None, dict | None]:
    """Each user's first embedding in the file and the rows that built it."""
    if path is None:
        return None, None
    table, draws, _ = load_user_embeddings(path)
    first = {}
    for index, draw in enumerate(draws):
        first.setdefault(draw.user_id, (table[index], draw.rows))
    return {u: e for u, (e, _) in first.items()}, {u: rows for u, (_, rows) in first.items()}


def main() -> None:
    from accelerate import Accelerator, InitProcessGroupKwargs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    # `Accelerator` reads `accelerate launch`'s settings (PartialState alone misses --cpu); the long timeout lets
    # processes that finish early wait at the last barrier for the others
    state = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))])
    args.device = str(state.device)
    dataset = load_pickapic_dataset(args.dataset_name, split=args.dataset_split)
    embeddings, profiles = first_draws(args.user_embeddings)
    users = plan_evaluation_users(
        dataset, held_out_users(args), args.num_profile_pairs, args.max_prompts, args.max_users, args.profile_seed,
        profiles,
    )  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k != "device"}
    settings["users"] = [user.user_id for user in users]
    # more users or prompts extend a run; other changes would mix two experiments; every process checks
    extends = ("users", "max_users", "max_prompts", "prompts_per_batch")
    check_settings(args.output_dir, settings, may_change=extends, write=state.is_main_process)
    pipe = load_pipeline(args)
    options = parse_reward_model_paths(args.reward_model_paths)
    scorers = load_reward_scorers(args.scorers, options, device=state.device)
    judges = build_judges(
        scorers if args.held_out_pairs_judge else None, args.vlm_judge, device=state.device, dtype=pipe.prior.dtype
    )
    records = evaluate_personalization(
        pipe, dataset, users, args.output_dir, scorers, judges, embeddings, max_judge_pairs=args.max_judge_pairs,
        prompts_per_batch=args.prompts_per_batch, seed=args.seed, state=state, **generation_kwargs(args),
    )  # fmt: skip
    if state.is_main_process:
        summary = write_evaluation_report(records, args.output_dir, settings, seed=args.seed)
        for metric, row in summary["win_rates"].items():
            logger.info("%s: win rate %.1f%% (95%% CI %.1f-%.1f%%)", metric, 100 * row["mean"],
                        100 * row["ci95"][0], 100 * row["ci95"][1])  # fmt: skip
        logger.info("Report written to %s", os.path.join(args.output_dir, "report.md"))


if __name__ == "__main__":
    main()
