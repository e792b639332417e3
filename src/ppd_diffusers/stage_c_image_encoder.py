"""``StageCImageEncoder``: Stability's EfficientNetV2-S encoder that makes Stable Cascade Stage C latents from images.

Stage C (the "prior") denoises ``16 x 24 x 24`` latents for a 1024 px image. Those latents are the output of
Stability's "effnet" encoder (``effnet_encoder.safetensors``, Stability-AI/StableCascade ``modules/effnet.py``):
torchvision's EfficientNetV2-S feature extractor (1280 channels at 1/32 of the input size), a 1x1 convolution to
16 channels and a BatchNorm without affine parameters that standardises each channel. diffusers does not ship
it; it is needed to train Stage C (here: PPD's Diffusion-DPO) on real images.

Sizes: for an image meant to be ``height x width`` pixels, Stage C works on
``ceil(height / 42.67) x ceil(width / 42.67)`` latents (what the Stable Cascade pipelines generate), and the
encoder downsamples by exactly 32, so images are brought to ``32 * ceil(height / 42.67)`` by
``32 * ceil(width / 42.67)`` pixels before encoding: 1024 -> 768 px -> 24, 512 -> 384 -> 12,
768 -> 576 -> 18, 1536 -> 1152 -> 36. For multiples of 128 this is Stability's own rule (3/4 of the size,
rounded down to a multiple of 32; ``inference/utils.py::downscale_images``), and 768 px is the image size
Stability trained Stage C at (``configs/training/finetune_c_3b.yaml``).

Preprocessing uses PIL and numpy only, so it works without torchvision; the network itself is built on
torchvision's maintained ``efficientnet_v2_s``, imported when an encoder is created.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .preference_pairs import ImageLike, load_rgb_image

__all__ = [
    "EFFNET_MEAN",
    "EFFNET_STD",
    "STABILITY_EFFNET_FILENAME",
    "STABILITY_EFFNET_REPO",
    "StageCImageEncoder",
    "effnet_input_size",
    "preprocess_images",
    "stage_c_latent_size",
]

# ImageNet statistics on [0, 1] RGB: Stability's `effnet_preprocess` in train/train_b.py and train/train_c.py
EFFNET_MEAN = (0.485, 0.456, 0.406)
EFFNET_STD = (0.229, 0.224, 0.225)
# image pixels per Stage C latent pixel, as in the Stable Cascade pipelines (`resolution_multiple`)
STAGE_C_RESOLUTION_MULTIPLE = 42.67
# EfficientNetV2-S features downsample by 32
EFFNET_DOWNSAMPLING = 32
# Stability's original file: the root of the Stable Cascade repo (models/download_models.sh fetches the same
# file from `stabilityai/StableWurst`)
STABILITY_EFFNET_REPO = "stabilityai/stable-cascade"
STABILITY_EFFNET_FILENAME = "effnet_encoder.safetensors"
_BACKBONE_CHANNELS = 1280


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def stage_c_latent_size(
    height: int = 1024, width: int = 1024, resolution_multiple: float = STAGE_C_RESOLUTION_MULTIPLE
) -> tuple[int, int]:
    """The Stage C latent grid for an image of ``height x width`` pixels: ``ceil(size / resolution_multiple)``.

    The one place of this rounding: ``PersonalizedStableCascadePipeline`` sizes the latents it generates with it
    (with its ``resolution_multiple``, as diffusers' Stable Cascade pipelines do), so latents encoded for
    ``height x width`` match those the prior produces for that image size.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        resolution_multiple: Image pixels per latent pixel (Stable Cascade: 42.67).

    Returns:
        ``(latent_height, latent_width)``, e.g. ``(24, 24)`` for 1024 x 1024.

    Raises:
        ValueError: A size is not a positive integer, or ``resolution_multiple`` not a positive finite number.

    Examples:
        >>> stage_c_latent_size(1024, 1024), stage_c_latent_size(1024, 1536)
        ((24, 24), (24, 36))
        >>> stage_c_latent_size(32, 40, resolution_multiple=8.0)
        (4, 5)
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    if (
        isinstance(resolution_multiple, bool)
        or not isinstance(resolution_multiple, int | float | np.integer | np.floating)
        or not math.isfinite(resolution_multiple)
        or resolution_multiple <= 0
    ):
        raise ValueError(f"`resolution_multiple` must be a positive finite number, got {resolution_multiple!r}.")
    return math.ceil(height / resolution_multiple), math.ceil(width / resolution_multiple)


def effnet_input_size(height: int = 1024, width: int = 1024) -> tuple[int, int]:
    """The pixel size images are brought to before encoding, for a Stage C image of ``height x width``.

    ``32 * stage_c_latent_size(height, width)``: 1024 -> 768, 512 -> 384, 768 -> 576.

    Returns:
        ``(input_height, input_width)``.

    Examples:
        >>> effnet_input_size(1024, 1024)
        (768, 768)
    """
    latent_height, latent_width = stage_c_latent_size(height, width)
    return latent_height * EFFNET_DOWNSAMPLING, latent_width * EFFNET_DOWNSAMPLING


def _as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    # a 2-D/3-D array or tensor, a PIL image, bytes or a path is one image (not rows of pixels); 4-D is a batch
    if isinstance(images, PIL.Image.Image | bytes | bytearray | str | os.PathLike | Mapping):
        return [images]
    if isinstance(images, np.ndarray | torch.Tensor):
        if images.ndim == 4:
            return list(images)
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    raise ValueError(
        "`images` must be an image or a list of images (PIL, arrays, tensors, bytes, paths), "
        f"got {type(images).__name__}."
    )


def preprocess_images(images: ImageLike | Sequence[ImageLike], height: int = 1024, width: int = 1024) -> torch.Tensor:
    """Turns images into the normalized pixel batch the encoder expects, for Stage C images of ``height x width``.

    Each image is converted to RGB, scaled to cover ``effnet_input_size(height, width)`` (768 x 768 for 1024 x
    1024) keeping its aspect ratio, center-cropped to it, put in ``[0, 1]`` and normalized with the ImageNet
    mean and std, as Stability does before its encoder. Resizing is PIL's bilinear filter, which antialiases
    when shrinking like the ``Resize(..., antialias=True)`` of Stability's training data pipeline; the crop
    is the center (Stability's training used random or "smart" crops, a deterministic center crop is what
    precomputed latents want).

    Args:
        images: One image or a list: PIL images, ``numpy`` arrays or tensors (``uint8`` or floats in
            ``[0, 1]``), encoded file bytes, file paths, or ``datasets``' ``{"bytes", "path"}`` dicts.
        height: Height in pixels of the Stage C image the latents stand for (not of the encoder input).
        width: Width in pixels, likewise.

    Returns:
        A float32 tensor ``(N, 3, input_height, input_width)``.

    Raises:
        ValueError: An image cannot be read; the message names ``images[i]``.

    Examples:
        ```py
        import PIL.Image

        pixels = preprocess_images([PIL.Image.new("RGB", (1024, 1024), "gray")], height=1024, width=1024)
        pixels.shape  # torch.Size([1, 3, 768, 768])
        ```
    """
    items = _as_image_list(images)
    if not items:
        raise ValueError("`images` is empty: pass at least one image.")
    return _pixel_batch(items, height, width)


def _pixel_batch(items: Sequence[ImageLike], height: int, width: int, first_index: int = 0) -> torch.Tensor:
    input_height, input_width = effnet_input_size(height, width)
    mean = np.asarray(EFFNET_MEAN, dtype=np.float32)
    std = np.asarray(EFFNET_STD, dtype=np.float32)
    batch = np.empty((len(items), 3, input_height, input_width), dtype=np.float32)
    for i, item in enumerate(items):
        image = load_rgb_image(item, name=f"images[{first_index + i}]")
        # `fit` crops the source to the target aspect ratio first, then resizes once: no double resampling
        image = PIL.ImageOps.fit(image, (input_width, input_height), method=PIL.Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        batch[i] = ((pixels - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(batch)


def _import_efficientnet_v2_s():
    try:
        from torchvision.models import efficientnet_v2_s
    except ImportError as error:
        raise ImportError(
            "`StageCImageEncoder` is built on torchvision's EfficientNetV2-S, and torchvision is not installed: "
            "run `pip install 'ppd-diffusers[train]'` (or `pip install torchvision`)."
        ) from error
    return efficientnet_v2_s


def _summarize(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(f"`{k}`" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class StageCImageEncoder(ModelMixin, ConfigMixin):
    r"""Stability's EfficientNetV2-S image encoder for Stable Cascade Stage C latents ("effnet").

    ``latents = mapper(backbone(pixels))``: ``backbone`` is torchvision's ``efficientnet_v2_s().features``
    (1280 channels at 1/32 of the input size), ``mapper`` a bias-free 1x1 convolution to ``latent_channels``
    followed by ``BatchNorm2d(latent_channels, affine=False)``, which standardises each latent channel with
    its running statistics. The module layout and parameter names are those of Stability's
    ``EfficientNetEncoder`` (``modules/effnet.py``), so ``effnet_encoder.safetensors`` loads without renaming
    (``from_stability_checkpoint``); ``save_pretrained``/``from_pretrained`` use the diffusers layout
    (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    The encoder is frozen: it is created in eval mode without gradients, and ``train()`` keeps it in eval
    mode, so its BatchNorm layers always use the stored running statistics (batch statistics would make
    each image's latents depend on the rest of its batch), whatever a training loop does to a parent module.
    Encode in float32 or bfloat16 (Stability encodes in float32).

    Args:
        latent_channels: Channels of the latents (16 for Stable Cascade).
        ppd_diffusers_version: The release that saved the weights; filled in automatically.

    Examples:
        ```py
        import PIL.Image
        from ppd_diffusers import StageCImageEncoder

        # effnet_encoder.safetensors from stabilityai/stable-cascade
        encoder = StageCImageEncoder.from_stability_checkpoint()
        encoder = encoder.to("cuda")
        latents = encoder.encode([PIL.Image.open("cat.png")], height=1024, width=1024)
        latents.shape  # torch.Size([1, 16, 24, 24])
        encoder.save_pretrained("stage_c_image_encoder")  # later: StageCImageEncoder.from_pretrained(...)
        ```
    """

    @register_to_config
    def __init__(self, latent_channels: int = 16, ppd_diffusers_version: str | None = None):
        super().__init__()
        _positive_int(latent_channels, "latent_channels")
        if ppd_diffusers_version is None:
            self.register_to_config(ppd_diffusers_version=_package_version())
        efficientnet_v2_s = _import_efficientnet_v2_s()
        # weights=None: the real weights come from Stability's file, torchvision's ImageNet ones would be replaced
        self.backbone = efficientnet_v2_s(weights=None).features
        self.mapper = nn.Sequential(
            nn.Conv2d(_BACKBONE_CHANNELS, latent_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(latent_channels, affine=False),
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> StageCImageEncoder:
        """Keeps the encoder in eval mode whatever ``mode`` is: it is frozen (see the class docstring)."""
        return super().train(False)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Writes ``config.json`` and safetensors weights (see ``ModelMixin.save_pretrained``).

        The config records the ppd-diffusers release that saved the weights.
        """
        self.register_to_config(ppd_diffusers_version=_package_version())
        super().save_pretrained(save_directory, **kwargs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encodes a normalized pixel batch (see ``preprocess``) into Stage C latents.

        Args:
            pixel_values: ``(N, 3, H, W)``, ImageNet-normalized (768 x 768 for a 1024 px image), on the
                encoder's device and dtype.

        Returns:
            Latents ``(N, latent_channels, ceil(H / 32), ceil(W / 32))``.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"`pixel_values` must be a batch of RGB images (N, 3, H, W), got shape {tuple(pixel_values.shape)}; "
                "use `encode` for PIL images, arrays or bytes."
            )
        return self.mapper(self.backbone(pixel_values))

    @staticmethod
    def preprocess(images: ImageLike | Sequence[ImageLike], height: int = 1024, width: int = 1024) -> torch.Tensor:
        """The normalized pixel batch for Stage C images of ``height x width`` (see ``preprocess_images``)."""
        return preprocess_images(images, height=height, width=width)

    @torch.no_grad()
    def encode(
        self,
        images: ImageLike | Sequence[ImageLike],
        height: int = 1024,
        width: int = 1024,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Stage C latents of images, as the prior would generate them for a ``height x width`` image.

        Images are preprocessed (``preprocess_images``: cover-resize and center-crop to
        ``effnet_input_size(height, width)``) and encoded ``batch_size`` at a time on the encoder's device
        and dtype, without gradients.

        Args:
            images: One image or a list (PIL, arrays, tensors, bytes, paths; see ``preprocess_images``).
            height: Height in pixels of the Stage C image (1024 gives 24 latent rows).
            width: Width in pixels of the Stage C image.
            batch_size: Images per forward pass.

        Returns:
            Latents ``(N, latent_channels, ceil(height / 42.67), ceil(width / 42.67))`` on the encoder's
            device, in its dtype.

        Raises:
            ValueError: An image cannot be read (the message names ``images[i]``), or a size is not positive.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        items = _as_image_list(images)
        effnet_input_size(height, width)  # validates the sizes before any decoding
        if not items:
            raise ValueError("`images` is empty: pass at least one image.")
        latents = []
        for start in range(0, len(items), batch_size):
            pixels = _pixel_batch(items[start : start + batch_size], height, width, first_index=start)
            latents.append(self(pixels.to(device=self.device, dtype=self.dtype)))
        return torch.cat(latents)

    @classmethod
    def from_stability_checkpoint(
        cls,
        pretrained_model_name_or_path_or_file: str | os.PathLike = STABILITY_EFFNET_REPO,
        filename: str = STABILITY_EFFNET_FILENAME,
        subfolder: str | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **hub_kwargs: Any,
    ) -> StageCImageEncoder:
        """Loads Stability's original single-file encoder (``effnet_encoder.safetensors``).

        Args:
            pretrained_model_name_or_path_or_file: A ``.safetensors`` file, a local folder holding
                ``filename`` (in ``subfolder``), or a Hub repo id (default ``stabilityai/stable-cascade``).
            filename: The file's name in the folder or repo.
            subfolder: Folder of the file inside the folder or repo.
            revision: Hub revision (branch, tag or commit).
            torch_dtype: Cast the loaded encoder to this dtype (the file holds float32).
            **hub_kwargs: Passed to ``huggingface_hub.hf_hub_download`` (``cache_dir``, ``token``,
                ``local_files_only``, ...).

        Raises:
            FileNotFoundError: A local folder without the file.
            ValueError: The file is not safetensors, or its keys or shapes do not match the encoder (the
                message names the missing, unexpected or mis-shaped keys).

        Examples:
            ```py
            encoder = StageCImageEncoder.from_stability_checkpoint()  # the Hub file
            encoder = StageCImageEncoder.from_stability_checkpoint("models/effnet_encoder.safetensors")
            ```
        """
        path = _resolve_checkpoint(pretrained_model_name_or_path_or_file, filename, subfolder, revision, hub_kwargs)
        state_dict = _load_safetensors(path)
        mapper_weight = state_dict.get("mapper.0.weight")
        latent_channels = int(mapper_weight.shape[0]) if mapper_weight is not None and mapper_weight.ndim == 4 else 16
        encoder = cls(latent_channels=latent_channels)
        encoder.load_stability_state_dict(state_dict, source=path)
        return encoder.to(dtype=torch_dtype) if torch_dtype is not None else encoder

    def load_stability_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "`state_dict`") -> None:
        """Loads a state dict in Stability's layout strictly, naming every missing, unexpected or mis-shaped key.

        ``*.num_batches_tracked`` counters may be absent (they do not affect an encoder in eval mode).

        Args:
            state_dict: Parameter name -> tensor, as in ``effnet_encoder.safetensors``.
            source: Where the dict came from, for error messages.
        """
        expected = self.state_dict()
        missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state_dict if k not in expected]
        mis_shaped = [
            f"`{k}` {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state_dict and state_dict[k].shape != v.shape
        ]
        if missing or unexpected or mis_shaped:
            problems = []
            if missing:
                problems.append(f"{len(missing)} missing keys: {_summarize(missing)}")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected keys: {_summarize(unexpected)}")
            if mis_shaped:
                problems.append(f"{len(mis_shaped)} keys of the wrong shape: {', '.join(mis_shaped[:8])}")
            raise ValueError(
                f"{source} is not a Stable Cascade EfficientNet encoder checkpoint in Stability's layout "
                f"(`backbone.*` = torchvision `efficientnet_v2_s().features`, `mapper.0.weight`, `mapper.1.*`): "
                + "; ".join(problems)
                + ". A folder written by `save_pretrained` loads with `StageCImageEncoder.from_pretrained`."
            )
        full = dict(state_dict)
        for key, value in expected.items():
            full.setdefault(key, value)  # only the optional BatchNorm counters can be missing here
        self.load_state_dict(full, strict=True)


def _resolve_checkpoint(
    source: str | os.PathLike, filename: str, subfolder: str | None, revision: str | None, hub_kwargs: dict
) -> str:
    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        path = os.path.join(source, subfolder or "", filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"`pretrained_model_name_or_path_or_file` is the folder {source!r}, which has no {path!r}: pass "
                "the file itself or the right `filename`/`subfolder` "
                f"(Stability's file is {STABILITY_EFFNET_FILENAME!r})."
            )
        return path
    # a Hub id is `name` or `owner/name`; anything else is a local path that does not exist, for which a Hub
    # lookup would only add a confusing repo-id error
    looks_local = source.startswith((".", "/", "~")) or source.endswith(".safetensors") or source.count("/") > 1
    if looks_local or (os.sep != "/" and os.sep in source):
        raise FileNotFoundError(
            f"`pretrained_model_name_or_path_or_file` {source!r} is neither an existing file or folder "
            "nor a Hub repo id (`owner/name`)."
        )
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source, filename, subfolder=subfolder, revision=revision, **hub_kwargs)


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        # pickled .pt/.ckpt files are never unpickled here: loading one can run arbitrary code
        raise ValueError(
            f"{path!r} is not a readable safetensors file ({error}). Only safetensors checkpoints are loaded; "
            "convert a trusted pickled one with `safetensors.torch.save_file(torch.load(...), ...)`."
        ) from error


def _package_version() -> str:
    from . import __version__

    return __version__
