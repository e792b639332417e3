"""Model configs and random-weight checkpoints for tests, benchmarks and the synthetic-user testbed.

Stage C ``StableCascadeUNet`` configs (the real prior, its lite variant, a CPU-sized miniature), and
LLaVA-OneVision / CLIP checkpoints written like Hub repos: their tokenizers are byte-level BPEs trained
on the spot with ``tokenizers`` and their image processors are transformers' PIL ones, so nothing is
downloaded and torchvision is not needed. Not imported by ``import ppd_diffusers``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "AESTHETIC_HEAD_SIZES",
    "CLIP_VIT_H_14",
    "CLIP_VIT_L_14",
    "FLUX_TRANSFORMER",
    "save_tiny_flux",
    "t5_text_tokenizer",
    "tiny_flux_components",
    "LLAVA_ONEVISION_0_5B",
    "PAELLA_VQ",
    "SDXL_UNET",
    "SDXL_SCHEDULER",
    "SDXL_VAE",
    "save_tiny_sdxl",
    "tiny_sdxl_components",
    "STAGE_B_DECODER",
    "STAGE_C_PRIOR",
    "STAGE_C_PRIOR_LITE",
    "TINY_LLAVA_ONEVISION",
    "TINY_OPEN_CLIP",
    "TINY_OPEN_CLIP_NAME",
    "clip_text_encoder",
    "clip_text_tokenizer",
    "save_random_aesthetic_head",
    "save_random_clip",
    "save_random_clip_like",
    "save_random_llava_onevision",
    "save_tiny_aesthetic_predictor",
    "save_tiny_hps",
    "save_tiny_stable_cascade",
    "tiny_clip",
    "tiny_flux_transformer",
    "tiny_flux_transformer_config",
    "tiny_sdxl_unet",
    "tiny_sdxl_unet_config",
    "tiny_stage_b_config",
    "tiny_stage_c_config",
]

CORPUS = ["a photo of a red cat", "a blue dog on grass", "preferred rejected prompt user assistant choices image"]

# `StableCascadeUNet` of stabilityai/stable-cascade-prior, subfolder "prior": 64 attention blocks, 3.6B
STAGE_C_PRIOR: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    timestep_ratio_embedding_dim=64,
    patch_size=1,
    conditioning_dim=2048,
    block_out_channels=(2048, 2048),
    num_attention_heads=(32, 32),
    down_num_layers_per_block=(8, 24),
    up_num_layers_per_block=(24, 8),
    down_blocks_repeat_mappers=(1, 1),
    up_blocks_repeat_mappers=(1, 1),
    clip_text_in_channels=1280,
    clip_text_pooled_in_channels=1280,
    clip_image_in_channels=768,
    clip_seq=4,
    dropout=(0.1, 0.1),
    self_attn=True,
    timestep_conditioning_type=("sca", "crp"),
    switch_level=(False,),
)
# subfolder "prior_lite": 32 attention blocks, 1.0B
STAGE_C_PRIOR_LITE: dict[str, Any] = dict(
    STAGE_C_PRIOR,
    conditioning_dim=1536,
    block_out_channels=(1536, 1536),
    num_attention_heads=(24, 24),
    down_num_layers_per_block=(4, 12),
    up_num_layers_per_block=(12, 4),
)


def tiny_stage_c_config(**overrides: Any) -> dict[str, Any]:
    """The Stage C prior layout shrunk to a few thousand parameters per block, for CPU tests and demos."""
    tiny = dict(
        in_channels=4,
        out_channels=4,
        timestep_ratio_embedding_dim=16,
        conditioning_dim=32,
        block_out_channels=(32, 32),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        clip_text_in_channels=16,
        clip_text_pooled_in_channels=16,
        clip_image_in_channels=16,
        clip_seq=2,
    )
    return {**STAGE_C_PRIOR, **tiny, **overrides}


# `StableCascadeUNet` of stabilityai/stable-cascade, subfolder "decoder" (Stage B): conditioned on Stage C latents
STAGE_B_DECODER: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=64,
    patch_size=2,
    conditioning_dim=1280,
    block_out_channels=(320, 640, 1280, 1280),
    num_attention_heads=(0, 0, 20, 20),
    down_num_layers_per_block=(2, 6, 28, 6),
    up_num_layers_per_block=(6, 28, 6, 2),
    down_blocks_repeat_mappers=(1, 1, 1, 1),
    up_blocks_repeat_mappers=(3, 3, 2, 2),
    block_types_per_layer=(
        ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
    ),
    clip_text_pooled_in_channels=1280,
    clip_seq=4,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    kernel_size=3,
    dropout=(0, 0, 0.1, 0.1),
    self_attn=True,
    timestep_conditioning_type=("sca",),
    switch_level=None,
)
# `PaellaVQModel` (Stage A) of stabilityai/stable-cascade, subfolder "vqgan": 4x upsampling
PAELLA_VQ: dict[str, Any] = dict(
    levels=2, bottleneck_blocks=12, embed_dim=384, latent_channels=4, num_vq_embeddings=8192, scale_factor=0.3764
)


def tiny_stage_b_config(**overrides: Any) -> dict[str, Any]:
    """The Stage B decoder layout shrunk for CPU tests: two levels, attention on the second."""
    tiny = dict(
        timestep_ratio_embedding_dim=16,
        patch_size=1,
        conditioning_dim=32,
        block_out_channels=(16, 32),
        num_attention_heads=(0, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(2, 1),
        block_types_per_layer=STAGE_B_DECODER["block_types_per_layer"][1:3],
        clip_text_pooled_in_channels=16,
        effnet_in_channels=4,
        dropout=(0, 0.1),
    )
    return {**STAGE_B_DECODER, **tiny, **overrides}


# sizes of save_random_llava_onevision
TINY_LLAVA_ONEVISION = dict(
    text_hidden=32, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=64,
    vision_hidden=16, vision_layers=2, vision_heads=2, vision_intermediate=32, image_size=28, patch_size=14,
)  # fmt: skip
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf: Qwen2-0.5B + SigLIP-so400m at 384 px (729 tokens per image)
LLAVA_ONEVISION_0_5B = dict(
    text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_intermediate=4864,
    vision_hidden=1152, vision_layers=26, vision_heads=16, vision_intermediate=4304, image_size=384, patch_size=14,
)  # fmt: skip


def byte_level_tokenizer(specials: list[str], post_processor: Any = None) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on a few words, with ``specials`` reserved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(CORPUS, trainer)
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return tokenizer


def save_random_llava_onevision(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: int
) -> None:
    """A random LLaVA-OneVision checkpoint (Qwen2 + SigLIP) with a byte-level tokenizer and PIL processor.

    Args:
        path: Folder to write, laid out like a Hub repo.
        seed: Seed of the random weights.
        dtype: dtype of the saved weights.
        **sizes: Overrides of ``TINY_LLAVA_ONEVISION`` (e.g. ``**LLAVA_ONEVISION_0_5B`` for the real size).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    sizes = {**TINY_LLAVA_ONEVISION, **sizes}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes["text_hidden"],
        intermediate_size=sizes["text_intermediate"],
        num_hidden_layers=sizes["text_layers"],
        num_attention_heads=sizes["text_heads"],
        num_key_value_heads=sizes["text_kv_heads"],
        max_position_embeddings=32768,
    )
    vision = SiglipVisionConfig(
        hidden_size=sizes["vision_hidden"],
        intermediate_size=sizes["vision_intermediate"],
        num_hidden_layers=sizes["vision_layers"],
        num_attention_heads=sizes["vision_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
    )
    size = sizes["image_size"]
    pinpoints = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    config = LlavaOnevisionConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor.save_pretrained(path)


def tiny_clip(
    seed: int = 0,
    hidden_size: int = 32,
    projection_dim: int = 24,
    num_hidden_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
) -> tuple[Any, Any, Any]:
    """A tiny random ``CLIPModel`` with a byte-level tokenizer that adds BOS/EOS as CLIP's does (its pooling
    reads the EOS) and a PIL image processor; returns ``(model, tokenizer, image_processor)``."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    specials = ["<|startoftext|>", "<|endoftext|>"]
    template = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(specials[0], 0), (specials[1], 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(specials, template),
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[1],
        model_max_length=77,
    )
    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 2,
    }
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **tower
    )
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **tower)
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    )
    size = {"shortest_edge": image_size}
    image_processor = CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, image_processor


def save_random_clip(path: str | os.PathLike, seed: int = 0) -> None:
    """Saves ``tiny_clip(seed)`` (model, tokenizer and image processor) to ``path``."""
    for part in tiny_clip(seed):
        part.save_pretrained(path)


def clip_text_tokenizer(model_max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` over single bytes (no merges): every word becomes its characters, the last
    one marked end-of-word, exactly as CLIP's own BPE does before merging."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        vocab.update({char + suffix: len(vocab) + i for i, char in enumerate(alphabet)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def clip_text_encoder(tokenizer: Any, hidden_size: int, projection_dim: int, **sizes: int) -> Any:
    """A random ``CLIPTextModelWithProjection`` for ``tokenizer`` (as many positions as it pads to).

    Args:
        tokenizer: A tokenizer from ``clip_text_tokenizer`` (BOS 0, EOS and padding 1).
        hidden_size: Width of the text tower (the ``clip_text_in_channels`` of a matching Stage C).
        projection_dim: Width of the pooled embedding (its ``clip_text_pooled_in_channels``).
        **sizes: Overrides of ``intermediate_size`` (2 x hidden), ``num_hidden_layers`` and ``num_attention_heads``
            (2 each).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        hidden_size=hidden_size,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **{"intermediate_size": 2 * hidden_size, "num_hidden_layers": 2, "num_attention_heads": 2, **sizes},
    )
    return CLIPTextModelWithProjection(config).eval()


def save_tiny_stable_cascade(
    prior_path: str | os.PathLike,
    decoder_path: str | os.PathLike | None = None,
    seed: int = 0,
    variant: str | None = None,
) -> None:
    """Random tiny Stable Cascade repos laid out like ``stabilityai/stable-cascade-prior`` and
    ``stabilityai/stable-cascade``.

    The prior folder gets ``prior``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``image_encoder`` and
    ``feature_extractor``; the decoder folder gets ``decoder``, ``vqgan`` and ``scheduler``. Stage C has 4
    latent channels; with ``resolution_multiple=8`` and ``latent_dim_scale=2`` a 32 px image is a 4x4 Stage C
    latent, an 8x8 Stage B latent and 4x that after the VQGAN.

    Args:
        prior_path: Folder for the Stage C repo.
        decoder_path: Folder for the Stage B/A repo (skipped when ``None``).
        seed: Seed of the random weights.
        variant: Also the variant name of the UNets' weight files (e.g. ``"bf16"``, saved in bfloat16), as
            the Hub repos ship both.
    """
    from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    def save_unet(unet: StableCascadeUNet, path: str) -> None:
        unet.save_pretrained(path)
        if variant is not None:
            unet.to(torch.bfloat16).save_pretrained(path, variant=variant)

    torch.manual_seed(seed)
    tokenizer = clip_text_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=16,
    )  # fmt: skip
    save_unet(StableCascadeUNet(**tiny_stage_c_config()), os.path.join(prior_path, "prior"))
    clip_text_encoder(tokenizer, hidden_size=16, projection_dim=16).save_pretrained(
        os.path.join(prior_path, "text_encoder")
    )
    tokenizer.save_pretrained(os.path.join(prior_path, "tokenizer"))
    DDPMWuerstchenScheduler().save_pretrained(os.path.join(prior_path, "scheduler"))
    CLIPVisionModelWithProjection(vision).save_pretrained(os.path.join(prior_path, "image_encoder"))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        os.path.join(prior_path, "feature_extractor")
    )
    if decoder_path is None:
        return
    from .paella import PaellaVQModel

    save_unet(StableCascadeUNet(**tiny_stage_b_config()), os.path.join(decoder_path, "decoder"))
    tiny_vq = dict(bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=32)
    PaellaVQModel(**{**PAELLA_VQ, **tiny_vq}).save_pretrained(os.path.join(decoder_path, "vqgan"))
    DDPMWuerstchenScheduler().save_pretrained(os.path.join(decoder_path, "scheduler"))


# ---------------------------------------------------------------------------------------------- reward scorers
# an open_clip model config (open_clip's JSON layout) shaped like ViT-H-14 but a few thousand parameters per
# block; the text tower keeps open_clip's BPE vocabulary (its tokenizer is bundled, nothing is downloaded)
TINY_OPEN_CLIP_NAME = "ppd-tiny-ViT"
TINY_OPEN_CLIP: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# the LAION aesthetic predictor v2 head (sac+logos+ava1-l14-linearMSE): widths from the CLIP embedding to the score
AESTHETIC_HEAD_SIZES = (768, 1024, 128, 64, 16, 1)
# `CLIPConfig` arguments of openai/clip-vit-large-patch14 (CLIP score, the aesthetic predictor's CLIP) and of
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's base), 224 px; their text vocabulary is left to the tokenizer
CLIP_VIT_L_14: dict[str, Any] = dict(
    projection_dim=768,
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
    ),
)
CLIP_VIT_H_14: dict[str, Any] = dict(
    projection_dim=1024,
    text_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"
    ),
    vision_config=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        hidden_act="gelu",
    ),
)  # fmt: skip


def save_random_aesthetic_head(
    path: str | os.PathLike, sizes: tuple[int, ...] = AESTHETIC_HEAD_SIZES, seed: int = 0
) -> None:
    """A random aesthetic predictor head in the published file name and state-dict layout
    (``layers.{0,2,4,6,7}``, linear layers of the widths ``sizes``), saved as a plain state dict of tensors."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for index, width_in, width_out in zip((0, 2, 4, 6, 7), sizes[:-1], sizes[1:], strict=True):
        state_dict[f"layers.{index}.weight"] = torch.randn(width_out, width_in, generator=generator) / width_in**0.5
        state_dict[f"layers.{index}.bias"] = torch.randn(width_out, generator=generator)
    os.makedirs(path, exist_ok=True)
    torch.save(state_dict, os.path.join(path, "sac+logos+ava1-l14-linearMSE.pth"))


def save_tiny_aesthetic_predictor(path: str | os.PathLike, seed: int = 0) -> None:
    """A folder holding a tiny random CLIP (``save_random_clip``, 24-wide embeddings) and a random aesthetic
    predictor head for it (``save_random_aesthetic_head``)."""
    save_random_clip(path, seed)
    save_random_aesthetic_head(path, (24, 32, 16, 8, 4, 1), seed)


def save_random_clip_like(
    path: str | os.PathLike, config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
) -> None:
    """A random ``CLIPModel`` of a real layout (e.g. ``CLIP_VIT_L_14``) at 224 px, with ``tiny_clip``'s byte-level
    tokenizer and transformers' default (torchvision-backend) ``CLIPImageProcessor``, as the Hub repos load."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    _, tokenizer, _ = tiny_clip(seed)
    text = dict(config["text_config"], vocab_size=len(tokenizer), max_position_embeddings=77)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(config["vision_config"], image_size=224)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in `dtype`: no transient float32 copy of a 1B model
    try:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config["projection_dim"]))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor().save_pretrained(path)


def save_tiny_hps(
    path: str | os.PathLike,
    seed: int = 0,
    filename: str = "HPS_v2.1_compressed.pt",
    model_name: str = TINY_OPEN_CLIP_NAME,
    dtype: torch.dtype = torch.float32,
) -> None:
    """A folder laid out like the Hub repo ``xswu/HPSv2``: a random open_clip model saved as HPSv2 saves its
    checkpoints (``{"state_dict": ...}``) under ``filename``.

    Args:
        path: The folder.
        seed: Seed of the random weights.
        filename: The checkpoint's name (HPSv2's are ``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt``).
        model_name: ``TINY_OPEN_CLIP_NAME`` (its model config is written beside the checkpoint as
            ``<TINY_OPEN_CLIP_NAME>.json``, which ``HPSv2Scorer.from_pretrained`` registers) or an open_clip
            model such as ``"ViT-H-14"`` (the real size).
        dtype: dtype of the saved weights.
    """
    import json

    import open_clip

    os.makedirs(path, exist_ok=True)
    if model_name == TINY_OPEN_CLIP_NAME:
        config = os.path.join(path, f"{TINY_OPEN_CLIP_NAME}.json")
        with open(config, "w") as f:
            json.dump(TINY_OPEN_CLIP, f, indent=2)
        open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    torch.save({"state_dict": model.to(dtype).state_dict()}, os.path.join(path, filename))


# ---------------------------------------------------------------------------------------------------- SDXL

# `UNet2DConditionModel` of stabilityai/stable-diffusion-xl-base-1.0, subfolder "unet": 70 cross-attention layers, 2.6B
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)


def tiny_sdxl_unet_config(**overrides: Any) -> dict[str, Any]:
    """An SDXL-shaped ``UNet2DConditionModel`` config small enough for CPU tests: 2 levels, 3 cross-attention
    layers, text width 32, pooled text width 32 and 6 time ids of width 4 (``text_time`` conditioning)."""
    tiny = dict(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        transformer_layers_per_block=(1, 1),
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=32 + 6 * 4,
        norm_num_groups=8,
    )
    return {**SDXL_UNET, **tiny, **overrides}


def tiny_sdxl_unet(seed: int = 0, **overrides: Any) -> Any:
    """A random ``UNet2DConditionModel`` from ``tiny_sdxl_unet_config`` (in eval mode)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_sdxl_unet_config(**overrides)).eval()


# `AutoencoderKL` (subfolder "vae") and `EulerDiscreteScheduler` (subfolder "scheduler") of
# stabilityai/stable-diffusion-xl-base-1.0; `tiny_sdxl_components` shrinks the VAE and keeps the scheduler
SDXL_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The components of a random tiny SDXL pipeline (``StableDiffusionXLPipeline(**components)``).

    Two CLIP text towers of width 16 (``text_encoder``: ``CLIPTextModel``; ``text_encoder_2``:
    ``CLIPTextModelWithProjection`` with 32-wide pooled embeddings) whose penultimate hidden states, side by
    side, are ``tiny_sdxl_unet``'s 32-wide text; byte-level ``clip_text_tokenizer``s of 16 tokens; a two-level
    ``AutoencoderKL`` with 4 latent channels (2x downsampling: the default 32 px image is a 16x16 latent);
    SDXL's ``EulerDiscreteScheduler`` settings. ``image_encoder`` and ``feature_extractor`` are ``None``.

    Args:
        seed: Seed of the random weights.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_text_tokenizer(model_max_length=16)
    torch.manual_seed(seed)
    unet = tiny_sdxl_unet(seed)
    vae = AutoencoderKL(
        **dict(
            SDXL_VAE,
            down_block_types=SDXL_VAE["down_block_types"][:2],
            up_block_types=SDXL_VAE["up_block_types"][:2],
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=32,
        )
    ).eval()
    text_encoder_2 = clip_text_encoder(tokenizer, hidden_size=16, projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_2.config.to_dict())).eval()
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=clip_text_tokenizer(model_max_length=16),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        image_encoder=None,
        feature_extractor=None,
    )


def save_tiny_sdxl(path: str | os.PathLike, seed: int = 0) -> None:
    """A random tiny SDXL repo laid out like ``stabilityai/stable-diffusion-xl-base-1.0`` (``model_index.json``,
    ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``scheduler``):
    ``StableDiffusionXLPipeline.from_pretrained(path)`` and the personalized pipeline both load it.

    Args:
        path: The folder.
        seed: Seed of the random weights (see ``tiny_sdxl_components``).
    """
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False).save_pretrained(path)


# ---------------------------------------------------------------------------------------------------- Flux

# `FluxTransformer2DModel` of black-forest-labs/FLUX.1-dev, subfolder "transformer": 19 double-stream blocks, 12B
FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def tiny_flux_transformer_config(**overrides: Any) -> dict[str, Any]:
    """A Flux-shaped ``FluxTransformer2DModel`` config for CPU tests: 2 double-stream and 1 single-stream block,
    2 heads of width 8, 16 packed latent channels (4 VAE channels x 2 x 2), text width 32, pooled width 32."""
    return (
        dict(
            FLUX_TRANSFORMER,
            in_channels=16,
            num_layers=2,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(2, 2, 4),
        )
        | overrides
    )


def tiny_flux_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A random ``FluxTransformer2DModel`` from ``tiny_flux_transformer_config`` (in eval mode)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**tiny_flux_transformer_config(**overrides)).eval()


def t5_text_tokenizer(model_max_length: int = 512) -> Any:
    """A ``T5TokenizerFast`` over single characters, built offline from a ``tokenizers`` Unigram vocabulary.

    T5's own layout: ``<pad>`` 0, ``</s>`` 1 (appended to every text), ``<unk>`` 2, then the word-start marker
    ``▁`` and each printable ASCII character with and without it, so any ASCII prompt tokenizes without
    unknowns. No sentinel ``<extra_id_*>`` tokens (nothing here masks spans). It saves and loads like a Hub one.
    """
    from transformers import T5TokenizerFast

    alphabet = [chr(code) for code in range(33, 127)]
    pieces = ["▁", *alphabet, *(f"▁{char}" for char in alphabet)]
    # equal scores: Unigram then prefers the fewest pieces, i.e. "▁x" at a word start
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((piece, -1.0) for piece in pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_flux_components(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny random ``FluxPipeline`` (``FluxPipeline(**tiny_flux_components())``).

    ``tiny_flux_transformer`` (16 packed channels = 4 VAE channels x 2 x 2, text width 32, pooled width 32); a
    ``CLIPTextModel`` of width 32 whose pooled output is the transformer's ``pooled_projections``, with
    ``clip_text_tokenizer``; a ``T5EncoderModel`` of width 32 with ``t5_text_tokenizer``; an ``AutoencoderKL``
    with 4 latent channels and 2 levels (``vae_scale_factor`` 2, so a 16 px image is an 8x8 latent and 4x4 packed
    tokens), no quant convs and Flux's scaling and shift factors; Flux's ``FlowMatchEulerDiscreteScheduler``.
    Each model is seeded on its own, so the transformer equals ``tiny_flux_transformer(seed)``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_text_tokenizer()
    tokenizer_2 = t5_text_tokenizer()
    transformer = tiny_flux_transformer(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        )
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return dict(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


def save_tiny_flux(path: str | os.PathLike, seed: int = 0) -> None:
    """A random tiny ``FluxPipeline`` folder laid out like ``black-forest-labs/FLUX.1-dev``.

    ``FluxPipeline.from_pretrained(path)`` and ``PersonalizedFluxPipeline.from_pretrained(path)`` both load it.
    Generate at 16 px (4x4 packed latent tokens) with a small ``max_sequence_length`` (e.g. 8) to stay fast.

    Args:
        path: The folder (``model_index.json`` and one subfolder per component).
        seed: Seed of the random weights (see ``tiny_flux_components``).
    """
    from diffusers import FluxPipeline

    FluxPipeline(**tiny_flux_components(seed)).save_pretrained(path)
