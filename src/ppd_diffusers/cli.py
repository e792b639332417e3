"""The ``ppd-diffusers`` command line: ``ppd-diffusers testbed [--quick]`` and the trainers of the testbed's
shipped models (``train-testbed-base``, ``train-testbed-encoder``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (bad values give a usage message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _check_writable(parser: argparse.ArgumentParser, option: str, folder: str) -> None:
    """Fails now, with a usage message, if ``folder`` cannot be created or written (not after the compute)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        parser.error(f"{option} {folder!r} is not a writable folder: {error.strerror or error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ppd-diffusers", description="Personalized Stable Cascade (PPD) tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    testbed = commands.add_parser("testbed", help="run the synthetic-user testbed and write its report")
    testbed.add_argument("--quick", action="store_true", help="the small configuration (minutes on a laptop CPU)")
    testbed.add_argument("--out", default="testbed-report", help="output folder")
    testbed.add_argument(
        "--seed",
        type=_count(0),
        nargs="+",
        default=[0],
        help="one seed, or several: a report per seed in OUT/seed-<seed> and their summary in OUT/seeds.md",
    )
    testbed.add_argument(
        "--resume",
        action="store_true",
        help="with several seeds: keep each seed's report already in OUT/seed-<seed> from the same configuration",
    )
    testbed.add_argument("--base_model", help="a base-model pipeline folder (default: the shipped one)")
    testbed.add_argument("--encoder", help="a CLIP checkpoint folder for the preference encoder (default: shipped)")
    testbed.add_argument(
        "--workers", type=_count(1), default=2, help="adapters trained at once, one core each (the report is the same)"
    )
    oracles = commands.add_parser(
        "testbed-oracles",
        help="the testbed's mixture experiment with the encoder and with oracle user embeddings (diagnosis step 15)",
    )
    oracles.add_argument("--quick", action="store_true", help="the small configuration")
    oracles.add_argument("--seed", type=_count(0), default=0)
    oracles.add_argument("--out", default="testbed-oracles", help="output folder (oracles.json, oracles.md)")
    oracles.add_argument("--workers", type=_count(1), default=2, help="adapters trained at once, one core each")
    base = commands.add_parser("train-testbed-base", help="train the testbed's base model from scratch")
    base.add_argument("--output", required=True, help="pipeline folder to write")
    base.add_argument("--steps", type=_count(1), default=4000)
    base.add_argument("--batch_size", type=_count(1), default=32)
    base.add_argument("--seed", type=_count(0), default=0)
    encoder = commands.add_parser("train-testbed-encoder", help="train the testbed's tiny CLIP preference encoder")
    encoder.add_argument("--output", required=True, help="checkpoint folder to write")
    encoder.add_argument("--steps", type=_count(1), default=1500)
    encoder.add_argument("--batch_size", type=_count(1), default=256)
    encoder.add_argument("--num_scenes", type=_count(1), default=20_000)
    encoder.add_argument("--seed", type=_count(0), default=0)
    args = parser.parse_args(argv)
    if args.command == "testbed":
        if args.resume and len(args.seed) == 1:
            parser.error("argument --resume: only with several seeds (--seed 17 18 19)")
        if len(set(args.seed)) != len(args.seed):
            parser.error(f"argument --seed: the seeds must differ, got {' '.join(map(str, args.seed))}")
    testbed_run = args.command.startswith("testbed")  # the runs write --out, the trainings --output
    _check_writable(parser, *(("--out", args.out) if testbed_run else ("--output", args.output)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.command == "testbed":
        from .testbed.loop import TestbedConfig
        from .testbed.run import run_testbed
        from .testbed.seeds import run_testbed_seeds

        seed, *more = args.seed
        config = TestbedConfig.quick(seed) if args.quick else TestbedConfig.full(seed)
        config.workers = args.workers
        models = dict(base_model=args.base_model, encoder=args.encoder)
        if more:
            start = time.perf_counter()  # this call's time: reports kept by --resume took theirs earlier
            run_testbed_seeds(config, args.seed, args.out, **models, resume=args.resume)
            print((Path(args.out) / "seeds.md").read_text())
            seconds = time.perf_counter() - start
            logging.getLogger("ppd_diffusers").info("reports written to %s (%.0f s)", args.out, seconds)
        else:
            report = run_testbed(config, args.out, **models)
            print((Path(args.out) / "report.md").read_text())  # the command's output is the report
            logging.getLogger("ppd_diffusers").info("report written to %s (%.0f s)", args.out, report["seconds"])
    elif args.command == "testbed-oracles":
        from .testbed.loop import TestbedConfig
        from .testbed.oracles import mixture_oracles, oracles_markdown

        config = TestbedConfig.quick(args.seed) if args.quick else TestbedConfig.full(args.seed)
        config.workers = args.workers
        results = mixture_oracles(config)
        (Path(args.out) / "oracles.json").write_text(json.dumps(results, indent=2) + "\n")
        (Path(args.out) / "oracles.md").write_text(table := oracles_markdown(results))
        print(table)
    elif args.command == "train-testbed-base":
        from .testbed.base_model import train_base_model

        train_base_model(args.output, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    else:
        from .testbed.encoder import train_testbed_encoder

        train_testbed_encoder(
            args.output, steps=args.steps, batch_size=args.batch_size, num_scenes=args.num_scenes, seed=args.seed
        )


if __name__ == "__main__":
    main()
