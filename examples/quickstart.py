"""Quickstart: personalize a (tiny, random) Stage C prior for two users with PPD, on a CPU in seconds.

Two synthetic users disagree: user A prefers latents with a positive mean, user B a negative one.
One `UserAdapter` is trained for both with the user-conditioned DPO loss; afterwards each user's
preferred latents are denoised better *under that user's embedding* than the rejected ones.

    python examples/quickstart.py [--steps 150]
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch
from diffusers import StableCascadeUNet
from tqdm.auto import tqdm

from ppd_diffusers import PPDLoss, UserAdapter
from ppd_diffusers.testing_utils import tiny_stage_c_config
from ppd_diffusers.training import ppd_dpo_step

logger = logging.getLogger("quickstart")


def preference_pairs(user_sign: torch.Tensor, generator: torch.Generator):
    """Pairs whose preferred latent has mean `+0.5 * sign` and rejected `-0.5 * sign`."""
    pairs = user_sign.shape[0]
    base = torch.randn(pairs, 4, 8, 8, generator=generator)
    shift = 0.5 * user_sign.view(-1, 1, 1, 1)
    return base + shift, base - shift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step, half from each user")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as hub:
        # Stands in for StableCascadeUNet.from_pretrained("stabilityai/stable-cascade-prior", subfolder="prior").
        StableCascadeUNet(**tiny_stage_c_config()).save_pretrained(f"{hub}/prior")
        unet = StableCascadeUNet.from_pretrained(f"{hub}/prior").eval().requires_grad_(False)

        adapter = UserAdapter.from_model(unet, user_embed_dim=8, num_user_tokens=2, user_token_dim=16)
        model = adapter.attach(unet)
        users = torch.randn(2, 1, 8)  # stand-ins for PreferenceEncoder embeddings of users A and B
        signs = torch.tensor([1.0, -1.0])
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
        loss_fn = PPDLoss(beta=200.0)
        generator = torch.Generator().manual_seed(args.seed)

        progress = tqdm(range(args.steps), desc="PPD training")
        for step in progress:
            who = torch.arange(args.pairs) % 2
            chosen, rejected = preference_pairs(signs[who], generator)
            out = ppd_dpo_step(
                model,
                chosen,
                rejected,
                clip_text_pooled=torch.zeros(args.pairs, 1, 16),
                user_embeds=users[who],
                loss_fn=loss_fn,
                generator=generator,
            )
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            if step == 0:
                logger.info("first loss %.4f (= log 2: a fresh adapter equals the base model)", out.loss.item())
            progress.set_postfix(loss=f"{out.loss.item():.3f}", acc=f"{out.implicit_accuracy.item():.2f}")

        # Evaluate: fresh pairs of each user, scored with the right user and with the other user.
        eval_generator = torch.Generator().manual_seed(args.seed + 1)
        for user, name in enumerate("AB"):
            chosen, rejected = preference_pairs(signs[user].repeat(64), eval_generator)
            kwargs = dict(clip_text_pooled=torch.zeros(64, 1, 16), loss_fn=loss_fn, generator=eval_generator)
            with torch.no_grad():
                own = ppd_dpo_step(model, chosen, rejected, user_embeds=users[user].repeat(64, 1, 1), **kwargs)
                other = ppd_dpo_step(model, chosen, rejected, user_embeds=users[1 - user].repeat(64, 1, 1), **kwargs)
            logger.info(
                "user %s: implicit accuracy with own embedding %.2f, with the other user's %.2f",
                name,
                own.implicit_accuracy.item(),
                other.implicit_accuracy.item(),
            )

        adapter.save_pretrained(f"{hub}/adapter")
        reloaded = UserAdapter.from_pretrained(f"{hub}/adapter")
        logger.info("saved and reloaded the adapter: %d parameters", sum(p.numel() for p in reloaded.parameters()))


if __name__ == "__main__":
    main()
