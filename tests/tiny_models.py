"""Tiny random LLaVA-OneVision and CLIP checkpoints, written like Hub repos, built offline in milliseconds."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

CORPUS = ["a photo of a red cat", "a blue dog on grass", "preferred rejected prompt user assistant choices image"]
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 28, 14  # 4 patches + 1 newline = 5 tokens per image
LLAVA_LAYERS = 4


def byte_level_tokenizer(specials: list[str], post_processor: processors.PostProcessor | None = None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(CORPUS, trainer)
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return tokenizer


def save_tiny_llava_onevision(path: str | os.PathLike, seed: int = 0) -> None:
    """A LLaVA-OneVision checkpoint (tiny Qwen2 + SigLIP) with a byte-level tokenizer and PIL processor."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LLAVA_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=LLAVA_PATCH,
    )
    size = LLAVA_IMAGE_SIZE
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
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor.save_pretrained(path)


def save_tiny_clip(path: str | os.PathLike, seed: int = 0) -> None:
    """A CLIP checkpoint whose tokenizer adds BOS/EOS as CLIP's does (its text pooling reads the EOS)."""
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
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
