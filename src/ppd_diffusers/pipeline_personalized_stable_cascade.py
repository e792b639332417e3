"""``PersonalizedStableCascadePipeline``: a prompt and a user's preference pairs in, that user's images out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMWuerstchenScheduler, DiffusionPipeline, StableCascadeUNet
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ._pipeline_loading import register_ppd_diffusers_components
from ._stable_cascade import compile_blocks
from .adapter import UserAdapter, UserKeyValues
from .encoder_base import BasePreferenceEncoder
from .guidance import guidance_branches, guided_prediction
from .loaders import PPDLoaderMixin, check_adapter_fits_encoder
from .personalized_unet import PersonalizedStageC
from .pipeline_inputs import OUTPUT_TYPES, check_call_inputs, check_user_count, check_user_inputs

__all__ = ["PersonalizedStableCascadePipeline", "PersonalizedStableCascadePipelineOutput"]

logger = logging.getLogger(__name__)

register_ppd_diffusers_components()


@dataclass
class PersonalizedStableCascadePipelineOutput(BaseOutput):
    """Output of ``PersonalizedStableCascadePipeline``.

    Args:
        images: PIL images, a ``(batch, height, width, 3)`` array or a ``(batch, 3, height, width)`` tensor in
            [0, 1]; with ``output_type="latent"`` the Stage C latents ``(batch, 16, h, w)``.
        user_embeds: The user embeddings used, one row per prompt or one for all (``None`` without a user):
            keep them to generate for the same users again without re-encoding their pairs.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    user_embeds: torch.Tensor | None = None


class PersonalizedStableCascadePipeline(DiffusionPipeline, PPDLoaderMixin):
    r"""Stable Cascade generating each user's preferred images from 4 of their preference pairs (PPD).

    A ``PreferenceEncoder`` turns a user's pairs into a user embedding; the ``UserAdapter``'s decoupled
    cross-attention feeds it into Stage C (``prior``), whose latents Stage B (``decoder``) and Stage A
    (``vqgan``) turn into an image. Only Stage C is personalized. Each prompt of a batch may have its own
    user, so one pipeline serves many users at once, and the user keys/values are computed once per call.
    Without a user (or with ``preference_scale=0`` or an untrained adapter) this is plain Stable Cascade,
    bit for bit.

    Args:
        prior: Stage C ``StableCascadeUNet``.
        text_encoder: CLIP text encoder (``CLIPTextModelWithProjection``), used by both stages.
        tokenizer: Its tokenizer.
        scheduler: Stage C ``DDPMWuerstchenScheduler``.
        user_adapter: The trained ``UserAdapter`` (see ``load_user_adapter``); ``None`` for no users.
        preference_encoder: Turns preference pairs into user embeddings; without it pass ``user_embeds``.
        image_encoder: Optional CLIP image encoder for image prompts (``images=``).
        feature_extractor: Its image processor.
        decoder: Stage B ``StableCascadeUNet``; ``None`` for a prior-only pipeline (``output_type="latent"``).
        vqgan: Stage A ``PaellaVQModel``.
        decoder_scheduler: Stage B ``DDPMWuerstchenScheduler``.
        resolution_multiple: Image pixels per Stage C latent pixel (42.67: 1024 px -> 24).
        latent_dim_scale: Stage B latent pixels per Stage C latent pixel (10.67: 24 -> 256).

    Examples:
        ```py
        import torch
        from ppd_diffusers import PersonalizedStableCascadePipeline

        pipe = PersonalizedStableCascadePipeline.from_pretrained(
            "ppd-diffusers/ppd-stable-cascade", torch_dtype=torch.bfloat16
        ).to("cuda")
        pairs = [("a cat in the snow", "cat_a.png", "cat_b.png"), ...]  # 4 (prompt, preferred, rejected)
        image = pipe("a lighthouse at dusk", preference_pairs=pairs).images[0]
        ```
    """

    model_cpu_offload_seq = "preference_encoder->text_encoder->image_encoder->user_adapter->prior->decoder->vqgan"
    _optional_components = [
        "user_adapter",
        "preference_encoder",
        "image_encoder",
        "feature_extractor",
        "decoder",
        "vqgan",
        "decoder_scheduler",
    ]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        prior: StableCascadeUNet,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: DDPMWuerstchenScheduler,
        user_adapter: UserAdapter | None = None,
        preference_encoder: BasePreferenceEncoder | None = None,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        decoder: StableCascadeUNet | None = None,
        vqgan: Any = None,
        decoder_scheduler: DDPMWuerstchenScheduler | None = None,
        resolution_multiple: float = 42.67,
        latent_dim_scale: float = 10.67,
    ):
        super().__init__()
        if user_adapter is not None:
            user_adapter.check_unet(prior)
        check_adapter_fits_encoder(user_adapter, preference_encoder)
        self.register_modules(
            prior=prior,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            user_adapter=user_adapter,
            preference_encoder=preference_encoder,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            decoder=decoder,
            vqgan=_loadable_vqgan(vqgan),
            decoder_scheduler=decoder_scheduler,
        )
        self.register_to_config(resolution_multiple=resolution_multiple, latent_dim_scale=latent_dim_scale)
        self._user_adapter_scale = 1.0
        self._personalized_prior: PersonalizedStageC | None = None
        self._whole_prior_compile_kwargs: dict[str, Any] | None = None

    def _offload_models(self, *models: torch.nn.Module | None) -> None:
        for hook in getattr(self, "_all_hooks", None) or []:
            if any(hook.model is model for model in models if model is not None):
                hook.offload()

    @property
    def num_timesteps(self) -> int:
        """Stage C denoising steps of the current call."""
        return self._num_timesteps

    # ------------------------------------------------------------------------------------------------------
    # users

    def encode_user(self, preference_pairs: Sequence[Any], batch_size: int = 8) -> torch.Tensor:
        """Encodes one user's preference pairs (or a list of users' pair lists) into user embeddings.

        Keep the result to generate for a user many times (``pipe(prompt, user_embeds=u)``), or mix users:
        ``torch.lerp(u_1, u_2, a)`` moves smoothly from one user's taste to another's.

        Args:
            preference_pairs: ``num_pairs`` (prompt, preferred, rejected) pairs, or one such list per user.
            batch_size: Users encoded per forward pass.

        Returns:
            A float32 tensor ``(users, tokens, width)``.
        """
        if self.preference_encoder is None:
            raise ValueError(
                "This pipeline has no `preference_encoder`: load one (e.g. `PreferenceEncoder.from_pretrained(...)`) "
                "and pass it to the pipeline, or pass precomputed `user_embeds`."
            )
        _onload(self.preference_encoder)
        return self.preference_encoder.encode(preference_pairs, batch_size=batch_size)

    def _user_key_values(
        self,
        user_embeds: torch.Tensor,
        scale: float | list[float],
        batch_size: int,
        per_prompt: int,
        device: torch.device,
    ) -> UserKeyValues:
        """The user keys/values of the personalized rows of a Stage C call, once per call, on the prior's device.

        Only the first group of rows (text and user, see ``guidance_branches``) has a user; the text-only and
        negative rows run the base attention and cost no user term.
        """
        scales = torch.tensor(scale if isinstance(scale, list | tuple) else [scale], dtype=torch.float32)
        scales = scales.expand(batch_size).repeat_interleave(per_prompt)
        user_embeds = user_embeds.expand(batch_size, -1, -1).repeat_interleave(per_prompt, dim=0)
        # an offloaded adapter's hook moves it (and its inputs) to the execution device; otherwise it runs where
        # its weights are, which may differ from the prior's device when components are spread over devices
        runs_on = device if _is_offloaded(self.user_adapter) else self.user_adapter.device
        user_kv = self.user_adapter(user_embeds.to(runs_on), scale=scales.to(runs_on))
        prior_device = device if _is_offloaded(self.prior) else self.prior.device
        return user_kv.to(device=prior_device, dtype=self.prior.dtype)

    def compile_prior(self, regional: bool = True, **compile_kwargs: Any) -> None:
        """Compiles Stage C for faster sampling, with a user and without (``torch.compile``).

        Two ways, as diffusers offers for its models:

        - ``regional=True`` (default; diffusers' ``compile_repeated_blocks``): each block of the prior and the
          personalized attention are compiled in place (see ``PersonalizedStageC.compile_repeated_blocks``).
          Repeated blocks share their code, so compiling takes seconds; launches between blocks remain.
        - ``regional=False``: the whole prior, and the whole personalized prior (``PersonalizedStageC``, kept
          by the pipeline for the adapter it was built with), become one graph each: minutes to compile per
          batch size, the fastest steps where a small batch is bound by kernel launches.

        On an H200 (full Stage C, bf16, batch 2 = one image with guidance) the eager step takes ~60 ms, the
        regional one ~46 ms after ~30 s of compiling, the whole-graph one ~27 ms after ~80 s per graph (see
        ``docs/benchmarks.md``). Later calls with another user, number of users or ``preference_scale`` reuse
        the compiled code (the pipeline gives every row its own user); another batch size compiles once more.
        Stage B and the encoders are not compiled. Whole graphs cannot trace accelerate's offload hooks: with
        ``enable_model_cpu_offload`` use the regional default.

        Args:
            regional: Compile block by block (``True``) or whole graphs (``False``).
            **compile_kwargs: Passed to ``torch.compile``, e.g. ``fullgraph=True``.

        Raises:
            ValueError: ``regional=False`` on a pipeline whose prior is offloaded.

        Examples:
            ```py
            pipe.compile_prior(fullgraph=True)
            images = pipe("a lighthouse at dusk", user_embeds=u).images  # compiles, then runs fast
            ```
        """
        if regional:
            compile_blocks(self.prior, **compile_kwargs)
            return
        if _is_offloaded(self.prior):
            raise ValueError(
                "`compile_prior(regional=False)` cannot trace the offload hooks of `enable_model_cpu_offload`: with "
                "offloading use `compile_prior()` (regional); whole graphs need the models kept on the accelerator."
            )
        self.prior.compile(**compile_kwargs)
        self._whole_prior_compile_kwargs = compile_kwargs
        self._personalized_prior = None  # rebuilt (and compiled) at the next personalized call

    def _personalized(self) -> PersonalizedStageC:
        """The prior run with the user adapter, kept across calls so that a compiled one stays compiled."""
        model = self._personalized_prior
        if model is None or model.unet is not self.prior or model.adapter is not self.user_adapter:
            model = self.user_adapter.attach(self.prior)
            if self._whole_prior_compile_kwargs is not None:
                model.compile(**self._whole_prior_compile_kwargs)
            self._personalized_prior = model
        return model

    # ------------------------------------------------------------------------------------------------------
    # conditioning

    def encode_prompt(
        self, prompt: list[str], device: torch.device, num_images_per_prompt: int = 1, warn_truncation: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP hidden states ``(batch, 77, C)`` and pooled embeddings ``(batch, 1, C)``, as Stable Cascade uses.

        Prompts longer than the tokenizer's limit are truncated, with a warning unless ``warn_truncation``
        is ``False`` (training encodes many long captions on purpose).
        """
        inputs = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        if warn_truncation:
            untruncated = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
            if untruncated.shape[-1] > inputs.input_ids.shape[-1]:
                logger.warning("Prompts longer than %d tokens were truncated.", self.tokenizer.model_max_length)
        output = self.text_encoder(
            inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device), output_hidden_states=True
        )
        dtype = self.prior.dtype
        hidden = output.hidden_states[-1].to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        pooled = output.text_embeds.unsqueeze(1).to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        return hidden, pooled

    def encode_image(self, images: list[Any], device: torch.device, rows: int) -> torch.Tensor:
        """CLIP image embeddings ``(rows, images, C)`` of image prompts, shared by every row."""
        pixels = self.feature_extractor(images, return_tensors="pt").pixel_values
        embeds = self.image_encoder(pixels.to(device, self.image_encoder.dtype)).image_embeds
        return embeds.to(self.prior.dtype).unsqueeze(0).expand(rows, -1, -1)

    # ------------------------------------------------------------------------------------------------------
    # checks

    def check_inputs(
        self,
        prompt: Any,
        negative_prompt: Any,
        preference_pairs: Any,
        user_embeds: torch.Tensor | None,
        preference_scale: Any,
        user_guidance_scale: float | None,
        height: int,
        width: int,
        num_inference_steps: int,
        decoder_num_inference_steps: int,
        num_images_per_prompt: int,
        guidance_scale: float,
        images: Any,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
        decoder_guidance_scale: float = 0.0,
        latents: torch.Tensor | None = None,
    ) -> None:
        """Raises ``ValueError`` naming the argument for every input the pipeline cannot use.

        Numbers and tensors must be finite: a NaN or infinite scale, user embedding or latent would give
        black images without an error.
        """
        batch_size = check_call_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, decoder_num_inference_steps,
            num_images_per_prompt, guidance_scale, decoder_guidance_scale, user_guidance_scale, latents,
        )  # fmt: skip
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if output_type != "latent" and (self.decoder is None or self.vqgan is None or self.decoder_scheduler is None):
            raise ValueError(
                f"`output_type={output_type!r}` needs Stage B and A (`decoder`, `vqgan`, `decoder_scheduler`), which "
                "this pipeline lacks: use `output_type='latent'` for Stage C latents."
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}."
            )
        if images is not None and (self.image_encoder is None or self.feature_extractor is None):
            raise ValueError("`images` needs the pipeline's `image_encoder` and `feature_extractor`.")
        check_user_inputs(
            preference_pairs, user_embeds, preference_scale, user_guidance_scale, batch_size, self.user_adapter,
            self.preference_encoder,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        preference_pairs: Sequence[Any] | None = None,
        user_embeds: torch.Tensor | None = None,
        preference_scale: float | list[float] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        user_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        images: list[PIL.Image.Image] | None = None,
        num_images_per_prompt: int = 1,
        decoder_num_inference_steps: int = 10,
        decoder_guidance_scale: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> PersonalizedStableCascadePipelineOutput | tuple:
        r"""Generates images for each prompt, in the taste of the user given with it.

        Args:
            prompt: The prompt, or a list of prompts.
            preference_pairs: One user's ``(prompt, preferred, rejected)`` pairs (as many as the encoder takes,
                4 for PPD) for every prompt, or one list of pairs per prompt. Images may be PIL images, paths,
                arrays or tensors (see ``PreferencePair``).
            user_embeds: Precomputed user embeddings (``encode_user``), ``(1 or len(prompt), tokens, width)``;
                instead of ``preference_pairs``.
            preference_scale: Weight of the user term, one number or one per prompt; by default the value of
                ``set_user_adapter_scale`` (1.0). ``0`` gives plain Stable Cascade for that prompt.
            height: Image height in pixels.
            width: Image width in pixels.
            num_inference_steps: Stage C denoising steps.
            guidance_scale: Classifier-free guidance of Stage C (off at ``<= 1``).
            user_guidance_scale: Guidance of the user term alone (see ``guided_prediction``):
                ``e_0 + g (e_t - e_0) + g_u (e_u - e_t)``. ``None`` guides the user like the prompt (``g_u = g``,
                or ``g_u = 1`` when text guidance is off), which costs no extra prediction; another value adds a
                text-only prediction per step (1.5x the Stage C cost with text guidance, 2x without) to push the
                user's taste harder (``> g``) or more gently (``< g``; ``0`` ignores the user).
            negative_prompt: What to guide away from: one string for all prompts or one per prompt (the empty
                prompt by default).
            images: Image prompts for Stage C (needs the pipeline's CLIP image encoder).
            num_images_per_prompt: Images generated per prompt.
            decoder_num_inference_steps: Stage B denoising steps.
            decoder_guidance_scale: Classifier-free guidance of Stage B (off at ``<= 1``, Stability's default).
            generator: Random generator(s); one per image makes each image independent of the batch.
            latents: Initial Stage C noise ``(len(prompt) * num_images_per_prompt, C, h, w)``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (Stage C latents, no decoder needed).
            return_dict: Return a ``PersonalizedStableCascadePipelineOutput`` rather than a tuple.
            callback_on_step_end: Called after every Stage C step as ``callback(pipe, step, t, tensors)``; it may
                return replacement ``latents``.
            callback_on_step_end_tensor_inputs: Tensors passed to the callback (``["latents"]``).

        Returns:
            ``PersonalizedStableCascadePipelineOutput``, or ``(images, user_embeds)`` when ``return_dict=False``.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            prompt, negative_prompt, preference_pairs, user_embeds, preference_scale, user_guidance_scale, height,
            width, num_inference_steps, decoder_num_inference_steps, num_images_per_prompt, guidance_scale, images,
            output_type, callback_on_step_end_tensor_inputs, decoder_guidance_scale, latents,
        )  # fmt: skip
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size, rows = len(prompts), len(prompts) * num_images_per_prompt
        device = self._execution_device

        if preference_pairs is not None:
            user_embeds = self.encode_user(preference_pairs)
            check_user_count("preference_pairs", user_embeds.shape[0], batch_size)
        has_user = user_embeds is not None
        personalized, text_only, uncond = guidance_branches(has_user, guidance_scale, user_guidance_scale)
        negatives_needed = uncond or decoder_guidance_scale > 1

        hidden, pooled = self.encode_prompt(prompts, device, num_images_per_prompt)
        negatives = None
        if negatives_needed:
            negative = "" if negative_prompt is None else negative_prompt
            negative = [negative] * batch_size if isinstance(negative, str) else negative
            negatives = self.encode_prompt(negative, device, num_images_per_prompt)
        if images is not None:
            clip_img = self.encode_image(images, device, rows)
        else:
            clip_img = hidden.new_zeros(rows, 1, self.prior.config.clip_image_in_channels)
        # with model offload, each hook only unloads the model just before it in `model_cpu_offload_seq`:
        # unload the encoders now, whichever of them ran, so that Stage C and B have the accelerator alone
        self._offload_models(self.preference_encoder, self.text_encoder, self.image_encoder)

        # rows of one Stage C call: [text+user | text | negative], as many groups as the guidance needs
        groups = [(hidden, pooled, clip_img)] * (personalized + text_only)
        if uncond:
            groups.append((*negatives, torch.zeros_like(clip_img)))
        conditioning = [torch.cat(parts) for parts in zip(*groups, strict=True)]
        user_kv = None
        if has_user:
            scale = self.user_adapter_scale if preference_scale is None else preference_scale
            user_kv = self._user_key_values(user_embeds, scale, batch_size, num_images_per_prompt, device)

        latents = self._denoise_prior(
            latents, rows, height, width, conditioning, user_kv, len(groups), guidance_scale, user_guidance_scale,
            (personalized, text_only, uncond), num_inference_steps, generator, device, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if output_type == "latent":
            output = latents
        else:
            decoder_negative = negatives[1] if decoder_guidance_scale > 1 else None
            output = self._decode(
                latents, pooled, decoder_negative, decoder_num_inference_steps, decoder_guidance_scale, generator,
                device, output_type,
            )  # fmt: skip
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output, user_embeds)
        return PersonalizedStableCascadePipelineOutput(images=output, user_embeds=user_embeds)

    def _denoise_prior(
        self,
        latents: torch.Tensor | None,
        rows: int,
        height: int,
        width: int,
        conditioning: list[torch.Tensor],
        user_kv: Any,
        groups: int,
        guidance_scale: float,
        user_guidance_scale: float | None,
        branches: tuple[bool, bool, bool],
        num_inference_steps: int,
        generator: Any,
        device: torch.device,
        callback_on_step_end: Any,
        callback_tensor_inputs: list[str],
    ) -> torch.Tensor:
        dtype = self.prior.dtype
        shape = (
            rows,
            self.prior.config.in_channels,
            ceil(height / self.config.resolution_multiple),
            ceil(width / self.config.resolution_multiple),
        )
        latents = _initial_noise(latents, shape, "latents", generator, device, dtype, self.scheduler)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps[:-1]
        self._num_timesteps = len(timesteps)
        hidden, pooled, clip_img = conditioning
        if user_kv is not None:
            model = self._personalized()
            _onload(self.prior)  # the personalized forward runs the prior's blocks, not its hooked `forward`
        for i, t in enumerate(self.progress_bar(timesteps)):
            ratio = t.expand(rows).to(dtype)
            inputs = dict(
                sample=torch.cat([latents] * groups),
                timestep_ratio=torch.cat([ratio] * groups),
                clip_text_pooled=pooled,
                clip_text=hidden,
                clip_img=clip_img,
                return_dict=False,
            )
            # only the first group of rows has a user: the others cost no user attention
            noise = self.prior(**inputs)[0] if user_kv is None else model(**inputs, user_kv=user_kv, user_rows=rows)[0]
            predictions = iter(noise.chunk(groups))
            personalized, text, uncond = (next(predictions) if needed else None for needed in branches)
            noise = guided_prediction(personalized, text, uncond, guidance_scale, user_guidance_scale)
            latents = self.scheduler.step(noise, timestep=ratio, sample=latents, generator=generator).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents} if "latents" in callback_tensor_inputs else {}
                latents = callback_on_step_end(self, i, t, tensors).pop("latents", latents)
        return latents

    def _decode(
        self,
        stage_c_latents: torch.Tensor,
        pooled: torch.Tensor,
        negative_pooled: torch.Tensor | None,
        num_inference_steps: int,
        guidance_scale: float,
        generator: Any,
        device: torch.device,
        output_type: str,
    ) -> Any:
        """Stage B turns Stage C latents into VQGAN latents; Stage A decodes them to images."""
        dtype = self.decoder.dtype
        effnet, pooled = stage_c_latents.to(dtype), pooled.to(dtype)
        if negative_pooled is not None:
            effnet = torch.cat([effnet, torch.zeros_like(effnet)])
            pooled = torch.cat([pooled, negative_pooled.to(dtype)])
        rows, _, height, width = stage_c_latents.shape
        scale = self.config.latent_dim_scale
        shape = (rows, self.decoder.config.in_channels, int(height * scale), int(width * scale))
        latents = _initial_noise(None, shape, "latents", generator, device, dtype, self.decoder_scheduler)
        self.decoder_scheduler.set_timesteps(num_inference_steps, device=device)
        groups = 2 if negative_pooled is not None else 1
        for t in self.progress_bar(self.decoder_scheduler.timesteps[:-1]):
            ratio = t.expand(rows).to(dtype)
            noise = self.decoder(
                sample=torch.cat([latents] * groups),
                timestep_ratio=torch.cat([ratio] * groups),
                clip_text_pooled=pooled,
                effnet=effnet,
                return_dict=False,
            )[0]
            if groups == 2:
                noise = guided_prediction(None, *noise.chunk(2), guidance_scale)
            step = self.decoder_scheduler.step(noise, timestep=ratio, sample=latents, generator=generator)
            latents = step.prev_sample
        images = self.vqgan.decode(self.vqgan.config.scale_factor * latents).sample.clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images


def _initial_noise(
    latents: torch.Tensor | None,
    shape: tuple[int, ...],
    name: str,
    generator: Any,
    device: torch.device,
    dtype: torch.dtype,
    scheduler: DDPMWuerstchenScheduler,
) -> torch.Tensor:
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"`generator` is a list of {len(generator)} generators for {shape[0]} images: give one each.")
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(latents.shape)}.")
    return latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma


def _is_offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate hooks (model or sequential CPU offload) decide where ``module`` runs."""
    return getattr(module, "_hf_hook", None) is not None or module.device.type == "meta"


def _onload(module: torch.nn.Module) -> None:
    """Runs a model-offload hook that only fires on ``forward`` (what diffusers' ``apply_forward_hook`` does
    for methods like ``vqgan.decode``), for modules used through other entry points."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


def _loadable_vqgan(vqgan: Any) -> Any:
    """diffusers' ``PaellaVQModel`` as ``ppd_diffusers.PaellaVQModel`` (the same class under a path saved
    pipelines can load, see ``ppd_diffusers.paella``)."""
    if vqgan is None or type(vqgan).__name__ != "PaellaVQModel":
        return vqgan
    from .paella import PaellaVQModel

    if not isinstance(vqgan, PaellaVQModel) and isinstance(vqgan, PaellaVQModel.__mro__[1]):
        vqgan.__class__ = PaellaVQModel
    return vqgan
