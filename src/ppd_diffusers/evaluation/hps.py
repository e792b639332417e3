"""``HPSv2Scorer``: Human Preference Score v2 / v2.1 (Wu et al. 2023), an open_clip ViT-H-14 fine-tuned on HPD v2.

open_clip (``pip install ppd-diffusers[eval]``, which brings torchvision) is imported only when a scorer
is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F

from .scorer import RewardScorer, load_tensors, resolve_weights_file

__all__ = ["HPS_CHECKPOINTS", "HPSv2Scorer", "hps_pixel_values"]

# HPSv2's `hps_version_map`: the files of the Hub repo xswu/HPSv2
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# what HPSv2 normalises with (open_clip's pretrained config of ViT-H-14 laion2b_s32b_b79k: OpenAI's CLIP values)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_pixel_values(image: PIL.Image.Image, size: int, device: str | torch.device | None = None) -> torch.Tensor:
    """HPSv2's evaluation transform (its ``image_transform(..., resize_longest_max=True)``), ``(3, size, size)``.

    The image becomes a [0, 1] tensor, its longer side is resized to ``size`` (bicubic, on the tensor, with
    torchvision's default antialiasing), it is padded with zeros (black, before normalisation) to a centred
    square, then normalised with OpenAI's CLIP mean and std. Unlike the original, an image whose longer side
    already equals ``size`` is padded too, so that batches stack. The work after decoding runs on ``device``
    (the scorer's: a GPU resizes many times faster than the CPU).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pixels = TF.pil_to_tensor(image).to(device).float() / 255  # what `to_tensor` does, on `device`
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_size = [round(height * scale), round(width * scale)]
        pixels = TF.resize(pixels, new_size, InterpolationMode.BICUBIC)
    pad_h, pad_w = size - pixels.shape[-2], size - pixels.shape[-1]
    pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return TF.normalize(pixels, OPENAI_MEAN, OPENAI_STD)


class HPSv2Scorer(RewardScorer):
    r"""HPSv2 / HPSv2.1: ``cos(E_I, E_T)`` of an open_clip ViT-H-14 fine-tuned on human preferences.

    Follows ``hpsv2.score`` (tgxs002/HPSv2, ``img_score.py``): the model is open_clip's ``ViT-H-14`` with
    the ``state_dict`` of the checkpoint loaded over it, the image goes through HPSv2's evaluation transform
    (``hps_pixel_values``: longer side to 224, zero-padded square), the prompt through open_clip's tokenizer,
    and the score is the diagonal of ``image_features @ text_features.T`` on unit features, with no logit
    scale: ~0.2-0.3. Papers, PPD's included (HPS ~23.9 for Stable Cascade), report it times 100.

    Args:
        model: An open_clip ``CLIP`` model.
        tokenizer: Its open_clip tokenizer.
        batch_size: Images scored per forward pass.
        show_progress: Show a progress bar when there is more than one batch.

    Example:
        ```py
        scorer = HPSv2Scorer.from_pretrained(device="cuda", torch_dtype=torch.bfloat16)  # HPSv2.1
        100 * scorer(images, prompts).mean()
        ```
    """

    name = "hps"
    default_name_or_path = "xswu/HPSv2"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, show_progress: bool = True):
        super().__init__(batch_size=batch_size, show_progress=show_progress)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        image_size = model.visual.image_size
        self.image_size = image_size[0] if isinstance(image_size, tuple | list) else int(image_size)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _score_batch(self, images: list[PIL.Image.Image], prompts: list[str] | None) -> torch.Tensor:
        device, dtype = self.device, self.dtype
        pixel_values = torch.stack([hps_pixel_values(image, self.image_size, device) for image in images])
        image_features = self.model.encode_image(pixel_values.to(dtype)).float()
        text_features = self.model.encode_text(self.tokenizer(prompts).to(device)).float()
        return (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = default_name_or_path,
        *,
        filename: str = HPS_CHECKPOINTS["v2.1"],
        model_name: str = "ViT-H-14",
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        **hub_kwargs: Any,
    ) -> HPSv2Scorer:
        """Builds open_clip's ``model_name`` and loads an HPS checkpoint into it.

        The checkpoint is read with ``torch.load(weights_only=True)``: a dict whose ``"state_dict"`` holds the
        weights (HPSv2's layout) or a bare state dict, loaded strictly. A file that needs arbitrary unpickling
        is refused rather than unpickled.

        Args:
            name_or_path: Hub repo holding ``filename``, a local folder holding it, or the checkpoint file.
            filename: ``"HPS_v2.1_compressed.pt"`` (HPSv2.1, the default) or ``"HPS_v2_compressed.pt"``
                (HPSv2); see ``HPS_CHECKPOINTS``.
            model_name: The open_clip architecture. A name open_clip does not know is looked up as
                ``<model_name>.json`` (an open_clip model config) beside the checkpoint and registered.
            torch_dtype: dtype of the model (``dtype`` is accepted too); float32 by default.
            device: Where the model runs.
            revision: Hub revision of ``name_or_path``.
            batch_size: Images scored per forward pass.
            show_progress: Show a progress bar when there is more than one batch.
            **hub_kwargs: ``token``, ``cache_dir``, ``local_files_only`` for the download.
        """
        import open_clip

        dtype = hub_kwargs.pop("dtype", None) or torch_dtype
        checkpoint = resolve_weights_file(name_or_path, filename, revision, **hub_kwargs)
        if model_name not in open_clip.list_models():
            config = os.path.join(os.path.dirname(checkpoint), f"{model_name}.json")
            if not os.path.isfile(config):
                raise ValueError(f"`model_name` {model_name!r} is neither an open_clip model nor a file {config!r}.")
            open_clip.add_model_config(config)
        state = load_tensors(checkpoint, "The HPS checkpoint")
        state_dict = state["state_dict"] if isinstance(state, dict) and "state_dict" in state else state
        with _without_random_init_warning():  # the weights are loaded right below
            model = open_clip.create_model(model_name, pretrained=None)
        model.load_state_dict(state_dict)
        scorer = cls(model, open_clip.get_tokenizer(model_name), batch_size=batch_size, show_progress=show_progress)
        return scorer.to(device=device, dtype=dtype)


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drops open_clip's "initialized randomly" warning (logged on the root logger) while building a model."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
