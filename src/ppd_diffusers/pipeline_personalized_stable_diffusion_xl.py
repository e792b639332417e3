"""``PersonalizedStableDiffusionXLPipeline``: diffusers' SDXL pipeline that also takes a user (PPD).

The pipeline is ``StableDiffusionXLPipeline`` plus a ``UserAdapter`` attached to the UNet's cross-attention
layers (``attn2``) once, at load. A call computes the user keys/values once and hands them to the parent's
denoising loop through ``cross_attention_kwargs``, so every feature of the parent (prompt embeddings,
callbacks, offloading, LoRA, IP-Adapter, ``denoising_end``...) runs unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput

from ._pipeline_loading import register_ppd_diffusers_components
from .adapter import UserAdapter
from .encoder_base import BasePreferenceEncoder
from .guidance import guidance_branches, guided_prediction
from .loaders import PPDLoaderMixin, check_user_components
from .pipeline_inputs import check_number, check_user_count, check_user_inputs, resolve_user_scale
from .processor_pipeline import UserProcessorsMixin, prompt_count
from .user_attention_processor import USER_KV_KWARG

__all__ = ["PersonalizedStableDiffusionXLPipeline", "PersonalizedStableDiffusionXLPipelineOutput"]

register_ppd_diffusers_components()

_PARENT_CALL = inspect.signature(StableDiffusionXLPipeline.__call__)
# what the parent's `**kwargs` takes: its deprecated step callback
_PARENT_EXTRA_KWARGS = {"callback", "callback_steps"}


@dataclass
class PersonalizedStableDiffusionXLPipelineOutput(BaseOutput):
    """Output of ``PersonalizedStableDiffusionXLPipeline``.

    Args:
        images: PIL images, a ``(batch, height, width, 3)`` array or a ``(batch, 3, height, width)`` tensor, as
            ``output_type`` asks; with ``output_type="latent"`` the UNet's latents.
        user_embeds: The user embeddings used, one row per prompt or one for all (``None`` without a user): keep
            them to generate for the same users again without encoding their pairs.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    user_embeds: torch.Tensor | None = None


class PersonalizedStableDiffusionXLPipeline(UserProcessorsMixin, StableDiffusionXLPipeline, PPDLoaderMixin):
    r"""Stable Diffusion XL generating each user's preferred images from a few of their preference pairs (PPD).

    Everything ``StableDiffusionXLPipeline`` does, plus a user: a ``PreferenceEncoder`` turns a user's
    ``(prompt, preferred, rejected)`` pairs into a user embedding, and the ``UserAdapter``'s decoupled
    cross-attention feeds it into every cross-attention layer of the UNet. Each prompt of a batch may have its
    own user. Without a user (or with ``user_scale=0``, or an untrained adapter) the images are
    ``StableDiffusionXLPipeline``'s, bit for bit.

    The user joins the conditional rows of classifier-free guidance only: the guided prediction is
    ``e_0 + g (e_user - e_0)``, with the negative prompt and no user in ``e_0`` (see the SDXL guide).

    Args:
        vae: The ``AutoencoderKL``.
        text_encoder: The first CLIP text encoder (``CLIPTextModel``).
        text_encoder_2: The second one, with projection (``CLIPTextModelWithProjection``).
        tokenizer: The first tokenizer.
        tokenizer_2: The second tokenizer.
        unet: The ``UNet2DConditionModel`` the adapter personalizes.
        scheduler: A diffusers scheduler.
        image_encoder: Optional CLIP image encoder for IP-Adapters.
        feature_extractor: Its image processor.
        force_zeros_for_empty_prompt: Use zeros as the embedding of an empty negative prompt (SDXL base does).
        add_watermarker: Watermark images with ``invisible-watermark`` (by default when it is installed).
        user_adapter: A ``UserAdapter`` built for ``unet`` (see ``load_user_adapter``); ``None`` for no users.
        preference_encoder: Turns preference pairs into user embeddings; without it pass ``user_embeds``.

    Examples:
        ```py
        import torch
        from ppd_diffusers import PersonalizedStableDiffusionXLPipeline

        pipe = PersonalizedStableDiffusionXLPipeline.from_base_model(
            "stabilityai/stable-diffusion-xl-base-1.0",
            user_adapter="my-sdxl-ppd-adapter",
            preference_encoder="my-ppd-encoder",
            dtype=torch.float16,
        ).to("cuda")
        pairs = [("a cat in the snow", "cat_a.png", "cat_b.png"), ...]  # (prompt, preferred, rejected)
        image = pipe("a lighthouse at dusk", preference_pairs=pairs).images[0]
        ```
    """

    # the encoder and the adapter run once per call, before the text encoders: in this order each model's
    # offload hook unloads the one that ran just before it
    model_cpu_offload_seq = "preference_encoder->user_adapter->text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "user_adapter", "preference_encoder"]
    _user_model_name = "unet"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        unet: UNet2DConditionModel,
        scheduler: Any,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        user_adapter: UserAdapter | None = None,
        preference_encoder: BasePreferenceEncoder | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        check_user_components(type(self), user_adapter, preference_encoder)
        self.register_modules(user_adapter=user_adapter, preference_encoder=preference_encoder)
        self._attach_user_adapter()

    # ------------------------------------------------------------------------------------------------------
    # parent features that replace the UNet's attention processors: the user processors wrap the new ones

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """``StableDiffusionXLPipeline.fuse_qkv_projections``; the user processors wrap the fused ones."""
        with self._user_processors_lifted():
            super().fuse_qkv_projections(unet=unet, vae=vae)

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """``StableDiffusionXLPipeline.unfuse_qkv_projections``, keeping the user adapter."""
        with self._user_processors_lifted():
            super().unfuse_qkv_projections(unet=unet, vae=vae)

    def set_attention_slice(self, slice_size: int | None) -> None:
        """diffusers' attention slicing (``enable_attention_slicing`` calls this), keeping the user adapter."""
        with self._user_processors_lifted():
            super().set_attention_slice(slice_size)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """diffusers' xFormers switch (``enable_xformers_memory_efficient_attention`` calls this), keeping the
        user adapter."""
        with self._user_processors_lifted():
            super().set_use_memory_efficient_attention_xformers(valid, attention_op)

    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *args: Any,
        preference_pairs: Sequence[Any] | None = None,
        user_embeds: torch.Tensor | None = None,
        user_scale: float | list[float] | None = None,
        user_guidance_scale: float | None = None,
        preference_scale: float | list[float] | None = None,
        **kwargs: Any,
    ) -> PersonalizedStableDiffusionXLPipelineOutput | tuple:
        r"""Generates images for each prompt, in the taste of the user given with it.

        Takes every argument of ``StableDiffusionXLPipeline.__call__`` (``prompt_2``, ``height``, ``width``,
        ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``num_images_per_prompt``,
        ``generator``, ``latents``, ``prompt_embeds`` and the other embeddings, ``ip_adapter_image``,
        ``output_type``, ``return_dict``, ``cross_attention_kwargs``, ``guidance_rescale``, the size
        conditioning, ``clip_skip``, ``callback_on_step_end``...) with the same meaning, plus:

        Args:
            prompt: The prompt, or a list of prompts (or pass ``prompt_embeds``).
            *args: The parent's further positional arguments, in its order.
            preference_pairs: One user's ``(prompt, preferred, rejected)`` pairs for every prompt, or one list
                of pairs per prompt (see ``encode_user``).
            user_embeds: Precomputed user embeddings (``encode_user``), ``(1 or number of prompts, tokens,
                width)``; instead of ``preference_pairs``.
            user_scale: Weight of the user term, one number or one per prompt; by default the value of
                ``set_user_adapter_scale`` (1.0). ``0`` gives plain SDXL for that prompt.
            user_guidance_scale: Guidance of the user term alone: ``e_0 + g (e_t - e_0) + g_u (e_u - e_t)``
                (see ``guided_prediction``). ``None`` guides the user like the prompt (``g_u = g``, or ``g_u =
                1`` without guidance), which costs nothing; another value adds a text-only prediction to each
                UNet call (1.5x the UNet's cost with guidance, 2x without).
            preference_scale: The deprecated name of ``user_scale`` (``FutureWarning``), as in the Stable Cascade
                pipeline.
            **kwargs: The parent's keyword arguments.

        Returns:
            ``PersonalizedStableDiffusionXLPipelineOutput``, or ``(images, user_embeds)`` when
            ``return_dict=False``.
        """
        user_scale = resolve_user_scale(user_scale, preference_scale)
        call = _PARENT_CALL.bind(self, prompt, *args, **kwargs)
        call.apply_defaults()
        arguments = call.arguments
        # the parent swallows unknown keyword arguments: refuse them rather than ignore a misspelt option
        unknown = sorted(set(arguments["kwargs"]) - _PARENT_EXTRA_KWARGS)
        if unknown:
            raise TypeError(f"`{type(self).__name__}.__call__` got unexpected arguments {unknown}.")
        batch_size = prompt_count(arguments["prompt"], arguments["prompt_embeds"])
        per_prompt = arguments["num_images_per_prompt"]
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {per_prompt!r}.")
        attention_kwargs = arguments["cross_attention_kwargs"]
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise ValueError(f"`cross_attention_kwargs` must be a dict, got {type(attention_kwargs).__name__}.")
        check_user_inputs(
            preference_pairs, user_embeds, user_scale, user_guidance_scale, batch_size, self.user_adapter,
            self.preference_encoder,
        )  # fmt: skip
        if user_guidance_scale is not None:
            check_number("user_guidance_scale", user_guidance_scale)
        if preference_pairs is not None:
            user_embeds = self.encode_user(preference_pairs)
            check_user_count("preference_pairs", user_embeds.shape[0], batch_size)

        return_dict = arguments["return_dict"]
        arguments["return_dict"] = True
        guidance = None
        if user_embeds is not None:
            if USER_KV_KWARG in (attention_kwargs or {}):
                raise ValueError(
                    f"`cross_attention_kwargs` holds `{USER_KV_KWARG}` and a user was given: pass the user through "
                    "`preference_pairs`/`user_embeds` only."
                )
            self._ensure_user_processors()
            rows = batch_size * per_prompt
            # the user goes on the last `rows` rows: the conditional half of diffusers' [negative, positive] batch
            # with guidance, every row without it (also after a callback such as `SDXLCFGCutoffCallback` turns
            # guidance off mid-way)
            user_kv = self.prepare_user_kv(
                user_embeds, user_scale, batch_size, per_prompt, self._execution_device, rows=slice(-rows, None)
            )
            arguments["cross_attention_kwargs"] = {**(attention_kwargs or {}), USER_KV_KWARG: user_kv}
            if user_guidance_scale is not None:
                guidance = _UserGuidance(self, rows, float(user_guidance_scale))
        try:
            with guidance.hooked() if guidance is not None else nullcontext():
                output = super().__call__(*call.args[1:], **call.kwargs)
        finally:
            # the parent keeps the call's kwargs as `cross_attention_kwargs`: drop the user keys/values with the call
            self._cross_attention_kwargs = attention_kwargs
        if not return_dict:
            return (output.images, user_embeds)
        return PersonalizedStableDiffusionXLPipelineOutput(images=output.images, user_embeds=user_embeds)


class _UserGuidance:
    """``user_guidance_scale`` inside the parent's denoising loop, by hooks on the UNet for one call.

    Before each UNet call the last ``rows`` rows (the conditional prompt rows, which get the user) are
    copied once more, without a user, in front of them: ``[negative, text, text + user]`` with guidance,
    ``[text, text + user]`` without. After the call the predictions ``e_0, e_t, e_u`` are folded into what the
    parent's loop expects: ``[e_0, e_t + (g_u / g) (e_u - e_t)]``, which the parent's ``e_0 + g (c - e_0)``
    turns into ``e_0 + g (e_t - e_0) + g_u (e_u - e_t)``, or ``e_t + g_u (e_u - e_t)`` without guidance. A
    call where ``g_u`` equals the text guidance needs no text-only rows and passes through untouched.
    """

    def __init__(self, pipe: PersonalizedStableDiffusionXLPipeline, rows: int, user_guidance_scale: float):
        self.pipe = pipe
        self.rows = rows
        self.user_guidance_scale = user_guidance_scale
        self._guidance_scale: float | None = None

    @contextmanager
    def hooked(self) -> Iterator[None]:
        unet = self.pipe.unet
        # first in line: other hooks see the three-part batch before the call and the folded prediction after it
        handles = [
            unet.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True),
            unet.register_forward_hook(self._after, with_kwargs=True, prepend=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        batch = (args[0] if args else kwargs["sample"]).shape[0]
        if batch == 2 * self.rows and self.pipe.do_classifier_free_guidance:
            guidance_scale = float(self.pipe.guidance_scale)
        elif batch == self.rows:
            guidance_scale = 1.0
        else:
            raise ValueError(
                f"`user_guidance_scale` expected UNet calls of {self.rows} or {2 * self.rows} rows, got {batch}."
            )
        _, text_only, _ = guidance_branches(True, guidance_scale, self.user_guidance_scale)
        self._guidance_scale = guidance_scale if text_only else None
        if not text_only:
            return None

        def with_text_rows(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                return torch.cat([value[: batch - self.rows], value[-self.rows :], value[-self.rows :]])
            if isinstance(value, dict):
                return {key: with_text_rows(item) for key, item in value.items()}
            if isinstance(value, list | tuple):
                return type(value)(with_text_rows(item) for item in value)
            return value

        args = tuple(with_text_rows(arg) for arg in args)
        kwargs = {
            key: value if key == "cross_attention_kwargs" else with_text_rows(value) for key, value in kwargs.items()
        }
        return args, kwargs

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        guidance_scale, self._guidance_scale = self._guidance_scale, None
        if guidance_scale is None:
            return None
        prediction = output[0] if isinstance(output, tuple) else output.sample
        rows, scale = self.rows, self.user_guidance_scale
        uncond, text, user = prediction[: -2 * rows], prediction[-2 * rows : -rows], prediction[-rows:]
        if uncond.shape[0]:
            folded = torch.cat([uncond, text + (scale / guidance_scale) * (user - text)])
        else:
            folded = guided_prediction(user, text, None, guidance_scale, scale)
        if isinstance(output, tuple):
            return (folded, *output[1:])
        output.sample = folded
        return output


@contextmanager
def _nothing() -> Iterator[None]:
    yield
