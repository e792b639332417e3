"""``MultiRewardConfig``: every setting of the multi-reward recipe (``reproduce_multi_reward``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..training.arguments import _help
from .scorer import parse_reward_model_paths

__all__ = ["DEFAULT_PROMPTS", "POOLED_USER", "MultiRewardConfig"]

POOLED_USER = "pooled"

DEFAULT_PROMPTS = [
    "a lighthouse on a cliff at dusk", "a bowl of fruit on a wooden table", "portrait of an old sailor",
    "a red fox in the snow", "a city street at night in the rain", "a cup of coffee next to a book",
    "a mountain lake at sunrise", "a robot reading a newspaper", "a field of sunflowers under a blue sky",
    "an astronaut riding a horse", "a cozy cabin in a pine forest", "a plate of sushi, top view",
    "a watercolor painting of a harbor", "a cat sleeping on a windowsill", "a steam train crossing a bridge",
    "a medieval castle in the fog", "a bouquet of tulips in a glass vase", "a hot air balloon over a desert",
    "a futuristic city skyline", "an owl perched on a branch at night", "a sailboat on a calm sea",
    "a bicycle leaning against a brick wall", "a snowy village at christmas", "a waterfall in a jungle",
    "a vintage car on a country road", "a dragon flying over mountains", "a child flying a kite on a beach",
    "a bowl of ramen with chopsticks", "an old library full of books", "a koi pond with lily pads",
    "a portrait of a woman in renaissance style", "a neon sign in a dark alley", "a tiger walking through tall grass",
    "a glass of red wine on a balcony", "a treehouse in autumn", "a pencil sketch of a cathedral",
    "a wolf howling at the moon", "a market stall full of spices", "a penguin on an iceberg",
    "a zen garden with raked sand",
]  # fmt: skip


@dataclass
class MultiRewardConfig:
    """Every setting of the multi-reward recipe (``examples/reproduce_multi_reward.py --help`` lists them).

    Defaults are a quick run on the built-in prompts; the module docstring gives the paper's scale and its cost.

    Examples:
        ```py
        from transformers import HfArgumentParser

        (config,) = HfArgumentParser(MultiRewardConfig).parse_args_into_dataclasses()
        ```
    """

    output_dir: str = field(
        default="multi-reward", metadata=_help("Every stage's output; finished stages are skipped.")
    )
    rewards: list[str] = field(
        default_factory=lambda: ["clip_score", "aesthetic", "hps"],
        metadata=_help("Reward models, each one user (names of `load_scorer`); the table's rows in this order."),
    )
    reward_model_paths: list[str] = field(
        default_factory=list,
        metadata=_help("`name=path` overrides of the reward models' checkpoints (Hub id/folder)."),
    )
    # --- prompts
    prompts_file: str | None = field(
        default=None, metadata=_help("Prompts, one a line (.txt) or a JSON list; unset: a built-in list of 40.")
    )
    num_prompts: int = field(default=32, metadata=_help("Training prompts (one image pair each per reward)."))
    num_eval_prompts: int = field(default=8, metadata=_help("Held-out prompts of the evaluation (after the others)."))
    # --- models
    pretrained_model_name_or_path: str = field(default="stabilityai/stable-cascade-prior", metadata=_help("Stage C."))
    prior_subfolder: str = field(default="prior", metadata=_help("`prior` (3.6B) or `prior_lite` (1B)."))
    decoder_model_name_or_path: str = field(default="stabilityai/stable-cascade", metadata=_help("Stage B/A."))
    variant: str | None = field(default=None, metadata=_help("Weight variant of the base models, e.g. `bf16`."))
    preference_encoder: str = field(
        default="llava-hf/llava-onevision-qwen2-0.5b-ov-hf", metadata=_help("VLM/CLIP id or a saved encoder folder.")
    )
    encoder_type: Literal["vlm", "clip"] = field(default="vlm", metadata=_help("`PreferenceEncoder` or the CLIP one."))
    encoder_layer: int | None = field(
        default=None, metadata=_help("Hidden layer of the VLM (default: the encoder's).")
    )
    dtype: Literal["float32", "bfloat16"] | None = field(
        default=None, metadata=_help("Generation dtype (default: bfloat16 on a GPU, float32 on the CPU).")
    )
    device: str | None = field(
        default=None, metadata=_help("Device of generation and encoding (default: cuda if any).")
    )
    # --- generation
    resolution: int = field(default=1024, metadata=_help("Image size in pixels (generation and training)."))
    resolution_multiple: float = field(default=42.67, metadata=_help("Image pixels per Stage C latent pixel."))
    latent_dim_scale: float = field(default=10.67, metadata=_help("Stage B latent pixels per Stage C latent pixel."))
    num_inference_steps: int = field(default=20, metadata=_help("Stage C steps."))
    decoder_num_inference_steps: int = field(default=10, metadata=_help("Stage B steps."))
    guidance_scale: float = field(default=4.0, metadata=_help("Stage C classifier-free guidance."))
    generation_batch_size: int = field(default=8, metadata=_help("Images per pipeline call."))
    scoring_batch_size: int = field(default=16, metadata=_help("Images per reward-model call."))
    eval_images_per_prompt: int = field(default=1, metadata=_help("Evaluation images per held-out prompt and model."))
    seed: int = field(default=0, metadata=_help("Seed of the prompt split, images, draws and training."))
    # --- training (the same budget for every method)
    max_train_steps: int = field(default=200, metadata=_help("Optimizer steps of every run."))
    train_batch_size: int = field(default=4, metadata=_help("Pairs per forward pass."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Forward passes per optimizer step."))
    learning_rate: float = field(default=1e-5, metadata=_help("AdamW learning rate (paper: 1e-5)."))
    lr_warmup_steps: int = field(default=20, metadata=_help("Warmup steps."))
    beta_dpo: float = field(default=5000.0, metadata=_help("Diffusion-DPO's beta."))
    num_user_tokens: int = field(default=4, metadata=_help("User tokens per user-embedding token."))
    user_token_dim: int = field(default=768, metadata=_help("Width of a user token."))
    user_dropout: float = field(default=0.0, metadata=_help("Probability of a pair trained with the adapter off."))
    prompt_dropout: float = field(default=0.05, metadata=_help("Probability of a pair trained on the empty prompt."))
    mixed_precision: Literal["no", "bf16"] | None = field(default=None, metadata=_help("`bf16` or `no`."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Less memory, ~25% slower training."))
    checkpointing_steps: int = field(default=500, metadata=_help("Resumable checkpoint every N steps."))
    report_to: str = field(default="none", metadata=_help("Trackers of the training runs."))

    def __post_init__(self):
        if not self.rewards:
            raise ValueError("`rewards` needs at least one reward model name.")
        if len(set(self.rewards)) != len(self.rewards) or POOLED_USER in self.rewards:
            raise ValueError(f"`rewards` must be distinct names other than {POOLED_USER!r}, got {self.rewards}.")
        positive = ["num_prompts", "num_eval_prompts", "resolution", "num_inference_steps", "generation_batch_size"]
        positive += ["decoder_num_inference_steps", "scoring_batch_size", "eval_images_per_prompt", "max_train_steps"]
        positive += ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        parse_reward_model_paths(self.reward_model_paths)

    @property
    def pairs_per_step(self) -> int:
        """Pairs per optimizer step on one process (every method's budget is ``max_train_steps`` of these)."""
        return self.train_batch_size * self.gradient_accumulation_steps
