"""``PersonalizedFluxPipeline``: diffusers' ``FluxPipeline`` with a user, from preference pairs or a user embedding.

The pipeline is ``FluxPipeline`` itself (prompt embeddings, callbacks, offloading, LoRA, IP-Adapter, true
classifier-free guidance all stay), plus a ``UserAdapter`` attached to the transformer once, when it is loaded:
the user attention processors (``FluxUserAttnProcessor``) sit in the double-stream blocks and run the original
processors whenever a transformer call carries no user. A call with a user computes the user keys/values once
and gives them to the transformer calls of ``FluxPipeline.__call__`` through a forward pre-hook held for that
call only (see ``_UserBranches``), so without a user nothing differs from ``FluxPipeline``, bit for bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxPipeline
from diffusers.utils import BaseOutput

from ._pipeline_loading import register_ppd_diffusers_components
from .adapter import UserAdapter, UserKeyValues
from .encoder_base import BasePreferenceEncoder
from .guidance import guidance_branches, guided_prediction
from .loaders import PPDLoaderMixin, check_user_components
from .pipeline_inputs import check_number, check_user_count, check_user_inputs, resolve_user_scale
from .processor_pipeline import UserProcessorsMixin, prompt_count
from .user_attention_processor import USER_KV_KWARG

__all__ = ["PersonalizedFluxPipeline", "PersonalizedFluxPipelineOutput"]


register_ppd_diffusers_components()

_PARENT_CALL = inspect.signature(FluxPipeline.__call__)


@dataclass
class PersonalizedFluxPipelineOutput(BaseOutput):
    """Output of ``PersonalizedFluxPipeline``.

    Args:
        images: PIL images, a ``(batch, height, width, 3)`` array or a ``(batch, 3, height, width)`` tensor in
            [0, 1]; with ``output_type="latent"`` the packed latents ``(batch, tokens, channels)`` as
            ``FluxPipeline`` returns them.
        user_embeds: The user embeddings used, one row per prompt or one for all (``None`` without a user): keep
            them to generate for the same users again without encoding their pairs.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    user_embeds: torch.Tensor | None = None


class PersonalizedFluxPipeline(UserProcessorsMixin, FluxPipeline, PPDLoaderMixin):
    r"""Flux generating each user's preferred images from a few of their preference pairs (PPD).

    A preference encoder turns a user's (prompt, preferred, rejected) pairs into a user embedding; the
    ``UserAdapter`` turns it into user keys and values for the joint attention of every double-stream block of the
    transformer, where the image tokens attend to them beside the text and image tokens (see
    ``FluxUserAttnProcessor``). Everything else is ``FluxPipeline``: each prompt of a batch may have its own user,
    and without a user (or with ``user_scale=0``, or an adapter fresh from ``UserAdapter.from_model``) the images
    equal ``FluxPipeline``'s bit for bit.

    Args:
        scheduler: ``FlowMatchEulerDiscreteScheduler``.
        vae: ``AutoencoderKL``.
        text_encoder: CLIP ``CLIPTextModel`` (its pooled output conditions the transformer).
        tokenizer: Its ``CLIPTokenizer``.
        text_encoder_2: T5 ``T5EncoderModel``.
        tokenizer_2: Its ``T5TokenizerFast``.
        transformer: ``FluxTransformer2DModel``.
        image_encoder: Optional CLIP image encoder for IP-Adapters.
        feature_extractor: Its image processor.
        user_adapter: A ``UserAdapter`` built for this transformer (``UserAdapter.from_model(transformer, ...)``);
            ``None`` for no users until ``load_user_adapter``.
        preference_encoder: Turns preference pairs into user embeddings; without it pass ``user_embeds``.

    Examples:
        ```py
        import torch
        from ppd_diffusers import PersonalizedFluxPipeline

        pipe = PersonalizedFluxPipeline.from_base_model(
            "black-forest-labs/FLUX.1-dev",
            user_adapter="path/to/flux-user-adapter",
            preference_encoder="path/to/preference-encoder",
            dtype=torch.bfloat16,
        ).to("cuda")
        pairs = [("a cat in the snow", "cat_a.png", "cat_b.png"), ...]  # (prompt, preferred, rejected)
        image = pipe("a lighthouse at dusk", preference_pairs=pairs).images[0]
        ```
    """

    _user_model_name = "transformer"
    model_cpu_offload_seq = (
        "preference_encoder->user_adapter->text_encoder->text_encoder_2->image_encoder->transformer->vae"
    )
    _optional_components = [*FluxPipeline._optional_components, "user_adapter", "preference_encoder"]

    def __init__(
        self,
        scheduler: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any,
        tokenizer_2: Any,
        transformer: Any,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        user_adapter: UserAdapter | None = None,
        preference_encoder: BasePreferenceEncoder | None = None,
    ):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
            image_encoder=image_encoder, feature_extractor=feature_extractor,
        )  # fmt: skip
        check_user_components(type(self), user_adapter, preference_encoder)
        self.register_modules(user_adapter=user_adapter, preference_encoder=preference_encoder)
        self._attach_user_adapter()

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
    ) -> PersonalizedFluxPipelineOutput | tuple:
        r"""Generates images for each prompt, in the taste of the user given with it.

        Takes every argument of ``FluxPipeline.__call__`` with the same meaning (``prompt_2``, ``negative_prompt``,
        ``true_cfg_scale``, ``height``, ``width``, ``num_inference_steps``, ``sigmas``, ``guidance_scale``,
        ``num_images_per_prompt``, ``generator``, ``latents``, ``prompt_embeds`` and the other embeddings,
        ``ip_adapter_image``..., ``output_type``, ``return_dict``, ``joint_attention_kwargs``,
        ``callback_on_step_end``, ``max_sequence_length``), plus a user. Without ``preference_pairs`` or
        ``user_embeds`` the images are ``FluxPipeline``'s, bit for bit.

        With true classifier-free guidance (``true_cfg_scale > 1`` and a negative prompt) the user is in the
        positive transformer call only and the negative call has the null user (no user term), so the user's
        effect is guided like the prompt's: ``e_0 + g (e_user - e_0)``. Flux-dev's distilled ``guidance_scale``
        is an input of the transformer, the same for every call: it does not guide the user.

        Args:
            prompt: The prompt, or a list of prompts (or pass ``prompt_embeds``).
            *args: ``FluxPipeline.__call__``'s further positional arguments, in its order.
            preference_pairs: One user's ``(prompt, preferred, rejected)`` pairs for every prompt, or one list of
                pairs per prompt (needs the pipeline's ``preference_encoder``, see ``encode_user``).
            user_embeds: Precomputed user embeddings (``encode_user``), ``(1 or number of prompts, tokens,
                width)``; instead of ``preference_pairs``.
            user_scale: Weight of the user term, one number or one per prompt; by default the value of
                ``set_user_adapter_scale`` (1.0). ``0`` gives plain Flux for that prompt.
            user_guidance_scale: Guidance of the user term alone (see ``guided_prediction``):
                ``e_0 + g (e_t - e_0) + g_u (e_u - e_t)`` with true CFG of scale ``g``, ``e_t + g_u (e_u - e_t)``
                without. ``None`` guides the user like the prompt (``g_u = g``, or 1 without true CFG) at no extra
                cost; another value adds a transformer call without the user to each positive call.
            preference_scale: The deprecated name of ``user_scale`` (``FutureWarning``), as in the Stable Cascade
                pipeline.
            **kwargs: ``FluxPipeline.__call__``'s keyword arguments. ``joint_attention_kwargs`` must not hold
                ``"ppd_user_kv"``: the pipeline puts the user there.

        Returns:
            ``PersonalizedFluxPipelineOutput``, or ``(images, user_embeds)`` when ``return_dict=False``.

        Raises:
            ValueError: A bad user argument, named in the message (``FluxPipeline`` checks its own).
        """
        user_scale = resolve_user_scale(user_scale, preference_scale)
        call = _PARENT_CALL.bind(self, prompt, *args, **kwargs)
        call.apply_defaults()
        arguments = call.arguments
        attention_kwargs = arguments["joint_attention_kwargs"]
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise ValueError(f"`joint_attention_kwargs` must be a dict, got {type(attention_kwargs).__name__}.")
        if USER_KV_KWARG in (attention_kwargs or {}):
            raise ValueError(
                f"`joint_attention_kwargs` must not hold {USER_KV_KWARG!r}: pass the user as `user_embeds` or "
                "`preference_pairs`."
            )
        if user_guidance_scale is not None:
            check_number("user_guidance_scale", user_guidance_scale)
        return_dict, arguments["return_dict"] = arguments["return_dict"], True
        if preference_pairs is None and user_embeds is None:
            check_user_inputs(None, None, user_scale, user_guidance_scale, 1, self.user_adapter, None)
            return self._output(super().__call__(*call.args[1:], **call.kwargs).images, None, return_dict)

        batch_size = prompt_count(arguments["prompt"], arguments["prompt_embeds"])
        per_prompt = arguments["num_images_per_prompt"]
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {per_prompt!r}.")
        check_user_inputs(
            preference_pairs, user_embeds, user_scale, user_guidance_scale, batch_size, self.user_adapter,
            self.preference_encoder,
        )  # fmt: skip
        true_cfg_scale = arguments["true_cfg_scale"]
        check_number("true_cfg_scale", true_cfg_scale)
        has_negative = arguments["negative_prompt"] is not None or (
            arguments["negative_prompt_embeds"] is not None and arguments["negative_pooled_prompt_embeds"] is not None
        )
        true_cfg = true_cfg_scale > 1 and has_negative  # FluxPipeline's own rule
        cfg_scale = float(true_cfg_scale) if true_cfg else 1.0
        _, text_only, _ = guidance_branches(True, cfg_scale, user_guidance_scale)
        if text_only and getattr(self.transformer, "is_cache_enabled", False):
            raise ValueError(
                "`user_guidance_scale` adds a transformer call per step, which diffusers' caches (`enable_cache`) "
                "would take for the next step: disable the cache or leave `user_guidance_scale=None`."
            )
        if preference_pairs is not None:
            user_embeds = self.encode_user(preference_pairs)
            check_user_count("preference_pairs", user_embeds.shape[0], batch_size)
        self._ensure_user_processors()
        user_kv = self.prepare_user_kv(
            user_embeds, self.user_scale if user_scale is None else user_scale, batch_size, per_prompt,
            self._execution_device, self.transformer.dtype,
        )  # fmt: skip
        # the user term relative to the text in the positive call, so that FluxPipeline's own true-CFG mix
        # e_0 + g (positive - e_0) comes out as e_0 + g (e_t - e_0) + g_u (e_u - e_t)
        user_weight = float(user_guidance_scale) / cfg_scale if text_only else None
        with _UserBranches(self.transformer, user_kv, true_cfg, user_weight):
            images = super().__call__(*call.args[1:], **call.kwargs).images
        return self._output(images, user_embeds, return_dict)

    @staticmethod
    def _output(images: Any, user_embeds: torch.Tensor | None, return_dict: bool) -> Any:
        if not return_dict:
            return (images, user_embeds)
        return PersonalizedFluxPipelineOutput(images=images, user_embeds=user_embeds)


class _UserBranches:
    """Gives the user to the transformer calls of one ``FluxPipeline.__call__``, held only during that call.

    A forward pre-hook adds the user keys/values to the ``joint_attention_kwargs`` of each *positive* call. With
    true classifier-free guidance ``FluxPipeline`` calls the transformer a second time per step, for the negative
    prompt, right after the positive call and on the same ``latents`` tensor: that call is recognised by its
    ``hidden_states`` being the very tensor of the call before, and runs without a user (the null user, as when
    training drops the user). ``tests/test_pipeline_flux.py`` pins this order of calls.

    With a separate user guidance weight ``w`` a forward hook runs the positive call once more without the user
    and returns ``e_text + w (e_user - e_text)`` in place of ``e_user``.
    """

    def __init__(
        self, transformer: torch.nn.Module, user_kv: UserKeyValues, true_cfg: bool, user_weight: float | None
    ):
        self.transformer = transformer
        self.user_kv = user_kv
        self.true_cfg = true_cfg
        self.user_weight = user_weight
        self._previous_latents: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _UserBranches:
        # first in line: other hooks see the call with its user, and the guided prediction after it
        transformer = self.transformer
        self._handles = [transformer.register_forward_pre_hook(self._give_user, with_kwargs=True, prepend=True)]
        if self.user_weight is not None:
            hook = transformer.register_forward_hook(self._guide_user, with_kwargs=True, prepend=True)
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._previous_latents = None

    def _give_user(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        latents = kwargs.get("hidden_states", args[0] if args else None)
        negative = self.true_cfg and latents is self._previous_latents
        self._previous_latents = latents
        if negative:
            return args, kwargs
        attention_kwargs = kwargs.get("joint_attention_kwargs") or {}
        return args, {**kwargs, "joint_attention_kwargs": {**attention_kwargs, USER_KV_KWARG: self.user_kv}}

    def _guide_user(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        attention_kwargs = kwargs.get("joint_attention_kwargs") or {}
        if USER_KV_KWARG not in attention_kwargs:  # the negative call
            return output
        without_user = {k: v for k, v in attention_kwargs.items() if k != USER_KV_KWARG}
        # `forward`, not `module(...)`: this hook must not run again (offload hooks wrap `forward` and still do)
        text = module.forward(*args, **{**kwargs, "joint_attention_kwargs": without_user})
        personalized_sample, text_sample = (out[0] if isinstance(out, tuple) else out.sample for out in (output, text))
        sample = guided_prediction(personalized_sample, text_sample, None, 1.0, self.user_weight)
        if isinstance(output, tuple):
            return (sample, *output[1:])
        output.sample = sample
        return output
