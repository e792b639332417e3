"""``PersonalizedStableCascadePipeline``: a prompt and a user's preference pairs in, that user's images out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from .loaders import PPDLoaderMixin, _is_offloaded, _onload, check_user_components
from .pipeline_inputs import (
    OUTPUT_TYPES,
    check_call_inputs,
    check_prompt_embeds,
    check_user_count,
    check_user_inputs,
    resolve_user_scale,
)
from .stage_c_image_encoder import stage_c_latent_size

__all__ = ["PersonalizedStableCascadePipeline", "PersonalizedStableCascadePipelineOutput"]

logger = logging.getLogger(__name__)

register_ppd_diffusers_components()

# tensors a Stage C callback may see besides `latents`; the first two in diffusers' [negative, positive] layout
_CFG_LAYOUT = ("prompt_embeds", "prompt_embeds_pooled")
_CALLBACK_TENSORS = (*_CFG_LAYOUT, "negative_prompt_embeds", "negative_prompt_embeds_pooled", "image_embeds")


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
    Without a user (or with ``user_scale=0`` or an untrained adapter) this is plain Stable Cascade,
    bit for bit.

    Args:
        prior: Stage C ``StableCascadeUNet``.
        text_encoder: CLIP text encoder (``CLIPTextModelWithProjection``), used by both stages.
        tokenizer: Its tokenizer.
        scheduler: Stage C ``DDPMWuerstchenScheduler``.
        user_adapter: The trained ``UserAdapter`` (see ``load_user_adapter``), attached to the prior here, once
            (``personalized_model``); ``None`` for no users.
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
            "ppd-diffusers/ppd-stable-cascade", dtype=torch.bfloat16
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
    _callback_tensor_inputs = ["latents", *_CALLBACK_TENSORS]
    _user_model_name = "prior"

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
        check_user_components(type(self), user_adapter, preference_encoder)
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
        self._user_scale = 1.0
        self._attach_user_adapter()

    def _offload_models(self, *models: torch.nn.Module | None) -> None:
        for hook in getattr(self, "_all_hooks", None) or []:
            if any(hook.model is model for model in models if model is not None):
                hook.offload()

    @property
    def num_timesteps(self) -> int:
        """Stage C denoising steps of the current call."""
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float:
        """Stage C's classifier-free guidance scale in the current call; a step callback may change it
        (``pipe._guidance_scale``, as diffusers' ``SDCFGCutoffCallback`` does), and the next steps follow."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether Stage C's classifier-free guidance is on (``guidance_scale > 1``)."""
        return self._guidance_scale > 1

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a step callback to skip the remaining Stage C steps."""
        return self._interrupt

    # ------------------------------------------------------------------------------------------------------
    # users

    def compile_prior(self, regional: bool = True, **compile_kwargs: Any) -> None:
        """Compiles Stage C for faster sampling, with a user and without (``torch.compile``).

        Two ways, as diffusers offers for its models:

        - ``regional=True`` (default; diffusers' ``compile_repeated_blocks``): each block of the prior and the
          personalized attention are compiled in place (see ``PersonalizedStageC.compile_repeated_blocks``).
          Repeated blocks share their code, so compiling takes seconds; launches between blocks remain.
        - ``regional=False``: the whole prior, and the whole personalized prior (``personalized_model``, the
          ``PersonalizedStageC`` of the loaded adapter, and that of any adapter loaded later), become one graph
          each: minutes to compile per batch size, the fastest steps where a small batch is bound by kernel
          launches.

        On an H200 (full Stage C, bf16, batch 2 = one image with guidance) the eager step takes ~60 ms, the
        regional one ~46 ms after ~30 s of compiling, the whole-graph one ~27 ms after ~80 s per graph (see
        ``docs/benchmarks.md``). Later calls with another user, number of users or ``user_scale`` reuse
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
        # the attached personalized prior is compiled in place, and so is that of an adapter loaded later
        self._personalized_compile_kwargs = compile_kwargs
        if self.personalized_model is not None:
            self.personalized_model.compile(**compile_kwargs)

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
        user_scale: Any,
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
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_pooled: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_pooled: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> None:
        """Raises ``ValueError`` naming the argument for every input the pipeline cannot use.

        Numbers and tensors must be finite: a NaN or infinite scale, embedding or latent would give black images
        without an error.
        """
        batch_size = check_call_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, decoder_num_inference_steps,
            num_images_per_prompt, guidance_scale, decoder_guidance_scale, user_guidance_scale, latents, prompt_embeds,
        )  # fmt: skip
        prior = self.prior.config
        check_prompt_embeds(
            batch_size, negative_prompt, prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds,
            negative_prompt_embeds_pooled, images, image_embeds, prior.clip_text_in_channels,
            prior.clip_text_pooled_in_channels, prior.clip_image_in_channels,
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
            preference_pairs, user_embeds, user_scale, user_guidance_scale, batch_size, self.user_adapter,
            self.preference_encoder,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        preference_pairs: Sequence[Any] | None = None,
        user_embeds: torch.Tensor | None = None,
        user_scale: float | list[float] | None = None,
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
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_pooled: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_pooled: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        preference_scale: float | list[float] | None = None,
    ) -> PersonalizedStableCascadePipelineOutput | tuple:
        r"""Generates images for each prompt, in the taste of the user given with it.

        Args:
            prompt: The prompt, or a list of prompts (or pass ``prompt_embeds``).
            preference_pairs: One user's ``(prompt, preferred, rejected)`` pairs (as many as the encoder takes,
                4 for PPD) for every prompt, or one list of pairs per prompt. Images may be PIL images, paths,
                arrays or tensors (see ``PreferencePair``).
            user_embeds: Precomputed user embeddings (``encode_user``), ``(1 or len(prompt), tokens, width)``;
                instead of ``preference_pairs``.
            user_scale: Weight of the user term, one number or one per prompt; by default the value of
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
            latents: Initial Stage C noise ``(prompts * num_images_per_prompt, C, h, w)``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (Stage C latents, no decoder needed).
            return_dict: Return a ``PersonalizedStableCascadePipelineOutput`` rather than a tuple.
            callback_on_step_end: Called after every Stage C step as ``callback(pipe, step, t, tensors)``, a
                function or a diffusers ``PipelineCallback`` (e.g. ``SDCFGCutoffCallback``); it may return
                replacements of the tensors (see ``callback_on_step_end_tensor_inputs``), set
                ``pipe._guidance_scale`` (guidance follows it from the next step on) or ``pipe._interrupt = True``
                (the remaining Stage C steps are skipped; Stage B decodes the latents as they are).
            callback_on_step_end_tensor_inputs: Tensors passed to the callback, from ``_callback_tensor_inputs``
                (default ``["latents"]``). As in diffusers' pipelines, ``prompt_embeds`` and
                ``prompt_embeds_pooled`` are ``[negative, positive]`` (``2 * rows``) while classifier-free
                guidance is on and the positive rows after; ``negative_prompt_embeds(_pooled)`` and
                ``image_embeds`` have one row per image. A returned ``prompt_embeds`` of ``2 * rows`` rows
                replaces both halves, of ``rows`` rows the positive ones; a returned slice of the last rows of the
                one passed (what the stock guidance-cutoff callbacks keep) leaves the positive ones as they are.
                Changes reach Stage C only: Stage B uses the call's own pooled embeddings.
            prompt_embeds: Precomputed CLIP hidden states ``(prompts, tokens, C)`` instead of ``prompt``, as
                diffusers' ``StableCascadePriorPipeline`` takes them; with ``prompt_embeds_pooled``.
            prompt_embeds_pooled: Pooled CLIP text embeddings ``(prompts, 1, C)``.
            negative_prompt_embeds: As ``prompt_embeds`` for the negative prompt, instead of ``negative_prompt``;
                with ``negative_prompt_embeds_pooled``.
            negative_prompt_embeds_pooled: As ``prompt_embeds_pooled`` for the negative prompt.
            image_embeds: Precomputed CLIP image embeddings ``(1 or prompts, images, C)`` instead of ``images``.
            preference_scale: Deprecated name of ``user_scale`` (``FutureWarning``; not both).

        Returns:
            ``PersonalizedStableCascadePipelineOutput``, or ``(images, user_embeds)`` when ``return_dict=False``.
        """
        user_scale = resolve_user_scale(user_scale, preference_scale)
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            prompt, negative_prompt, preference_pairs, user_embeds, user_scale, user_guidance_scale, height,
            width, num_inference_steps, decoder_num_inference_steps, num_images_per_prompt, guidance_scale, images,
            output_type, callback_on_step_end_tensor_inputs, decoder_guidance_scale, latents, prompt_embeds,
            prompt_embeds_pooled, negative_prompt_embeds, negative_prompt_embeds_pooled, image_embeds,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._interrupt = False
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        rows = batch_size * num_images_per_prompt
        device = self._execution_device

        if preference_pairs is not None:
            user_embeds = self.encode_user(preference_pairs)
            check_user_count("preference_pairs", user_embeds.shape[0], batch_size)
        if prompts is not None:
            prompt_embeds, prompt_embeds_pooled = self.encode_prompt(prompts, device, num_images_per_prompt)
        else:
            prompt_embeds, prompt_embeds_pooled = self._per_image(
                num_images_per_prompt, device, prompt_embeds, prompt_embeds_pooled
            )
        if negative_prompt_embeds is not None:
            negatives = self._per_image(
                num_images_per_prompt, device, negative_prompt_embeds, negative_prompt_embeds_pooled
            )
        elif self.do_classifier_free_guidance or decoder_guidance_scale > 1:
            negative = "" if negative_prompt is None else negative_prompt
            negative = [negative] * batch_size if isinstance(negative, str) else negative
            negatives = self.encode_prompt(negative, device, num_images_per_prompt)
        else:
            negatives = (None, None)
        if self.do_classifier_free_guidance and negatives[0].shape != prompt_embeds.shape:
            raise ValueError(
                f"Guidance puts the prompt's and the negative prompt's embeddings in one batch, but they have shapes "
                f"{tuple(prompt_embeds.shape)} and {tuple(negatives[0].shape)}: pass `prompt_embeds` and "
                "`negative_prompt_embeds` of the same length (77 tokens for text encoded here)."
            )
        if images is not None:
            image_embeds = self.encode_image(images, device, rows)
        elif image_embeds is not None:
            image_embeds = self._per_image(num_images_per_prompt, device, image_embeds.expand(batch_size, -1, -1))[0]
        else:
            image_embeds = prompt_embeds.new_zeros(rows, 1, self.prior.config.clip_image_in_channels)
        conditioning = _PriorConditioning(prompt_embeds, prompt_embeds_pooled, image_embeds, *negatives)
        # with model offload, each hook only unloads the model just before it in `model_cpu_offload_seq`:
        # unload the encoders now, whichever of them ran, so that Stage C and B have the accelerator alone
        self._offload_models(self.preference_encoder, self.text_encoder, self.image_encoder)
        user_kv = None
        if user_embeds is not None:
            # only the first group of rows (text and user) has a user: the others cost no user attention
            user_kv = self.prepare_user_kv(
                user_embeds, user_scale, batch_size, num_images_per_prompt, device, self.prior.dtype, rows=rows
            )

        latents = self._denoise_prior(
            latents, rows, height, width, conditioning, user_kv, user_guidance_scale, num_inference_steps,
            generator, device, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if output_type == "latent":
            output = latents
        else:
            decoder_negative = negatives[1] if decoder_guidance_scale > 1 else None
            output = self._decode(
                latents, prompt_embeds_pooled, decoder_negative, decoder_num_inference_steps, decoder_guidance_scale,
                generator, device, output_type,
            )  # fmt: skip
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output, user_embeds)
        return PersonalizedStableCascadePipelineOutput(images=output, user_embeds=user_embeds)

    def _per_image(self, num_images_per_prompt: int, device: torch.device, *embeds: torch.Tensor) -> tuple:
        """Per-prompt embeddings given to the call, one row per image, on ``device`` in the prior's dtype."""
        dtype = self.prior.dtype
        return tuple(e.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0) for e in embeds)

    def _denoise_prior(
        self,
        latents: torch.Tensor | None,
        rows: int,
        height: int,
        width: int,
        conditioning: _PriorConditioning,
        user_kv: UserKeyValues | None,
        user_guidance_scale: float | None,
        num_inference_steps: int,
        generator: Any,
        device: torch.device,
        callback_on_step_end: Any,
        callback_tensor_inputs: list[str],
    ) -> torch.Tensor:
        dtype = self.prior.dtype
        latent_size = stage_c_latent_size(height, width, self.config.resolution_multiple)
        shape = (rows, self.prior.config.in_channels, *latent_size)
        latents = _initial_noise(latents, shape, "latents", generator, device, dtype, self.scheduler)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps[:-1]
        self._num_timesteps = len(timesteps)
        if user_kv is not None:
            model = self.personalized_model
            _onload(self.prior)  # the personalized forward runs the prior's blocks, not its hooked `forward`
        batch, built_for = None, None
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            # guidance follows `_guidance_scale` at every step, so that a callback can switch it off
            branches = guidance_branches(user_kv is not None, self._guidance_scale, user_guidance_scale)
            if batch is None or branches != built_for:
                batch, built_for = conditioning.batch(branches), branches
            groups = sum(branches)
            ratio = t.expand(rows).to(dtype)
            inputs = dict(
                sample=torch.cat([latents] * groups),
                timestep_ratio=torch.cat([ratio] * groups),
                clip_text=batch[0],
                clip_text_pooled=batch[1],
                clip_img=batch[2],
                return_dict=False,
            )
            noise = self.prior(**inputs)[0] if user_kv is None else model(**inputs, user_kv=user_kv)[0]
            predictions = iter(noise.chunk(groups))
            personalized, text, uncond = (next(predictions) if needed else None for needed in branches)
            noise = guided_prediction(personalized, text, uncond, self._guidance_scale, user_guidance_scale)
            latents = self.scheduler.step(noise, timestep=ratio, sample=latents, generator=generator).prev_sample
            if callback_on_step_end is not None:
                cfg = self.do_classifier_free_guidance
                tensors = conditioning.callback_tensors(callback_tensor_inputs, cfg)
                if "latents" in callback_tensor_inputs:
                    tensors["latents"] = latents
                outputs = callback_on_step_end(self, i, t, dict(tensors))
                latents = outputs.pop("latents", latents)
                if conditioning.update(outputs, tensors, cfg, rows):
                    batch = None
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


@dataclass
class _PriorConditioning:
    """Stage C's text and image conditioning of one call (one row per image), and how callbacks see and change it."""

    prompt_embeds: torch.Tensor
    prompt_embeds_pooled: torch.Tensor
    image_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_embeds_pooled: torch.Tensor | None

    def batch(self, branches: tuple[bool, bool, bool]) -> list[torch.Tensor]:
        """``[clip_text, clip_text_pooled, clip_img]`` of the rows ``[text+user | text | negative]`` that the
        guidance ``branches`` need (see ``guidance_branches``)."""
        personalized, text_only, uncond = branches
        groups = [(self.prompt_embeds, self.prompt_embeds_pooled, self.image_embeds)] * (personalized + text_only)
        if uncond:
            if self.negative_prompt_embeds is None:
                raise ValueError(
                    "A callback switched classifier-free guidance on (`_guidance_scale > 1`) in a call that began "
                    "without it, so there are no negative embeddings: call with `guidance_scale > 1` instead."
                )
            zeros = torch.zeros_like(self.image_embeds)
            groups.append((self.negative_prompt_embeds, self.negative_prompt_embeds_pooled, zeros))
        return [torch.cat(parts) for parts in zip(*groups, strict=True)]

    def callback_tensors(self, names: list[str], cfg: bool) -> dict[str, torch.Tensor | None]:
        """The tensors ``names`` as diffusers' callbacks expect them: ``prompt_embeds(_pooled)`` as
        ``[negative, positive]`` while classifier-free guidance is on (``cfg``), the positive rows otherwise."""
        tensors = {}
        for name in names:
            if name in _CFG_LAYOUT:
                positive, negative = getattr(self, name), getattr(self, f"negative_{name}")
                tensors[name] = torch.cat([negative, positive]) if cfg and negative is not None else positive
            elif name != "latents":
                tensors[name] = getattr(self, name)
        return tensors

    def update(self, outputs: dict[str, Any], given: dict[str, Any], cfg: bool, rows: int) -> bool:
        """Takes the tensors a callback returned (``outputs``, without ``latents``) back into the per-group layout;
        ``given`` is what it was passed. Returns whether anything changed."""
        unknown = sorted(set(outputs) - set(_CALLBACK_TENSORS))
        if unknown:
            raise ValueError(f"The callback returned {unknown}; it may return {['latents', *_CALLBACK_TENSORS]}.")
        changed = False
        for name, value in outputs.items():
            if value is given.get(name):
                continue
            if name in _CFG_LAYOUT and value is not None and value.shape[0] != rows:
                passed = given.get(name)
                count = value.shape[0]
                if cfg and count == 2 * rows:
                    negative, value = value.chunk(2)
                    self._replace(f"negative_{name}", negative, rows)
                elif passed is not None and 0 < count < rows and torch.equal(value, passed[-count:]):
                    # the stock guidance-cutoff callbacks keep the last row(s), i.e. (some of) the positive rows:
                    # they mean "the conditional embeddings", which stay as they are
                    continue
            self._replace(name, value, rows)
            changed = True
        return changed

    def _replace(self, name: str, value: Any, rows: int) -> None:
        current = getattr(self, name)
        if current is None or not isinstance(value, torch.Tensor) or value.shape != current.shape:
            shape = "no tensor" if current is None else f"shape {tuple(current.shape)}"
            if name in _CFG_LAYOUT and current is not None:
                shape += f" (or {2 * rows} rows, [negative, positive], while guidance is on)"
            raise ValueError(f"The callback's `{name}` must have {shape}, got {_shape_of(value)}.")
        setattr(self, name, value.to(current.device, current.dtype))


def _shape_of(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


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


def _loadable_vqgan(vqgan: Any) -> Any:
    """diffusers' ``PaellaVQModel`` as ``ppd_diffusers.PaellaVQModel`` (the same class under a path saved
    pipelines can load, see ``ppd_diffusers.paella``)."""
    if vqgan is None or type(vqgan).__name__ != "PaellaVQModel":
        return vqgan
    from .paella import PaellaVQModel

    if not isinstance(vqgan, PaellaVQModel) and isinstance(vqgan, PaellaVQModel.__mro__[1]):
        vqgan.__class__ = PaellaVQModel
    return vqgan
