"""Loading what a ``PersonalizedStableCascadePipeline`` is built from: adapters, and Stable Cascade itself."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .adapter import UserAdapter
from .encoder_base import BasePreferenceEncoder

if TYPE_CHECKING:
    from .pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

__all__ = ["PPDLoaderMixin", "check_adapter_fits_encoder"]

logger = logging.getLogger(__name__)

STABLE_CASCADE_PRIOR = "stabilityai/stable-cascade-prior"
STABLE_CASCADE = "stabilityai/stable-cascade"
_HUB_KWARGS = ("token", "cache_dir", "local_files_only", "proxies", "force_download")


def check_adapter_fits_encoder(adapter: UserAdapter | None, encoder: BasePreferenceEncoder | None) -> None:
    """Raises ``ValueError`` when the encoder's embedding width is not the adapter's ``user_embed_dim``."""
    if adapter is None or encoder is None:
        return
    if adapter.config.user_embed_dim != encoder.embed_dim:
        raise ValueError(
            f"The `user_adapter` takes user embeddings of width {adapter.config.user_embed_dim}, but the "
            f"`preference_encoder` ({type(encoder).__name__}) makes embeddings of width {encoder.embed_dim}: use the "
            "encoder the adapter was trained with."
        )


class PPDLoaderMixin:
    """``load_user_adapter``, ``set_user_adapter_scale``, ``unload_user_adapter`` and ``from_stable_cascade``."""

    def load_user_adapter(
        self,
        pretrained_model_name_or_path_or_adapter: str | os.PathLike | UserAdapter,
        subfolder: str | None = None,
        weight_name: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        """Loads a trained ``UserAdapter`` into the pipeline (replacing any loaded one).

        Args:
            pretrained_model_name_or_path_or_adapter: A Hub id or folder written by ``UserAdapter.save_pretrained``,
                or a ``UserAdapter``.
            subfolder: Where the adapter lies inside the repo or folder.
            weight_name: A safetensors file to read instead of ``diffusion_pytorch_model.safetensors`` (the
                folder's ``config.json`` still describes the adapter).
            torch_dtype: The adapter's dtype; by default the prior's. The user keys/values are computed once
                per call, so a lower precision costs nothing per step.
            **kwargs: Hub arguments (``revision``, ``token``, ``cache_dir``, ``local_files_only``...) and, without
                ``weight_name``, anything ``UserAdapter.from_pretrained`` takes (e.g. ``variant``).

        Raises:
            ValueError: The adapter does not fit the prior or the preference encoder (the message names both).
        """
        source = pretrained_model_name_or_path_or_adapter
        if isinstance(source, UserAdapter):
            adapter = source
        elif weight_name is not None:
            adapter = _load_adapter_file(os.fspath(source), subfolder, weight_name, **kwargs)
        else:
            adapter = UserAdapter.from_pretrained(source, subfolder=subfolder, **kwargs)
        adapter.check_unet(self.prior)
        check_adapter_fits_encoder(adapter, self.preference_encoder)
        dtype = torch_dtype or self.prior.dtype
        # an offloaded prior sits on the CPU or the meta device: keep the adapter's weights on the CPU then
        device = self.prior.device if self.prior.device.type != "meta" else torch.device("cpu")
        adapter = adapter.to(device) if adapter.device != device else adapter
        adapter = (adapter.to(dtype) if adapter.dtype != dtype else adapter).eval()
        self.register_modules(user_adapter=adapter)
        self._personalized_prior = None  # built again for the new adapter (and not kept alive)
        self._reapply_model_offload()

    def set_user_adapter_scale(self, scale: float) -> None:
        """Sets the default weight of the user term (``preference_scale`` of a call overrides it).

        ``0`` gives the base model, ``1`` the trained adapter; values in between (or above) weaken (or
        strengthen) the user's influence.
        """
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ValueError(f"`scale` must be a number, got {scale!r}.")
        self._user_adapter_scale = float(scale)

    @property
    def user_adapter_scale(self) -> float:
        """The default user scale set by ``set_user_adapter_scale`` (1.0 unless set)."""
        return getattr(self, "_user_adapter_scale", 1.0)

    def unload_user_adapter(self) -> None:
        """Removes the user adapter: the pipeline becomes plain Stable Cascade (users are then refused)."""
        self.register_modules(user_adapter=None)
        self._personalized_prior = None
        self._user_adapter_scale = 1.0

    def _reapply_model_offload(self) -> None:
        # a component registered after `enable_model_cpu_offload` has no hook: rebuild the hook chain
        if getattr(self, "_all_hooks", None):
            self.enable_model_cpu_offload(device=self._offload_device)

    @classmethod
    def from_stable_cascade(
        cls,
        user_adapter: str | os.PathLike | UserAdapter | None = None,
        preference_encoder: str | os.PathLike | BasePreferenceEncoder | None = None,
        *,
        prior_model_name_or_path: str | os.PathLike = STABLE_CASCADE_PRIOR,
        decoder_model_name_or_path: str | os.PathLike | None = STABLE_CASCADE,
        prior_subfolder: str = "prior",
        decoder_subfolder: str = "decoder",
        load_image_encoder: bool = False,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        decoder_revision: str | None = None,
        user_adapter_kwargs: dict[str, Any] | None = None,
        preference_encoder_kwargs: dict[str, Any] | None = None,
        resolution_multiple: float = 42.67,
        latent_dim_scale: float = 10.67,
        **hub_kwargs: Any,
    ) -> PersonalizedStableCascadePipeline:
        """Builds the pipeline from Stability's Stable Cascade repos, a user adapter and a preference encoder.

        Stage C (prior, CLIP text encoder, tokenizer, scheduler, optionally the CLIP image encoder) comes from
        ``stabilityai/stable-cascade-prior``; Stage B and A (decoder, VQGAN, scheduler) from
        ``stabilityai/stable-cascade``. Both stages use the same CLIP text encoder, so it is loaded once.

        Args:
            user_adapter: Hub id or folder of a ``UserAdapter`` (or one already loaded); ``None`` for plain
                Stable Cascade.
            preference_encoder: Hub id or folder of a saved preference encoder, the id of a LLaVA-OneVision
                model to wrap with ``PreferenceEncoder`` defaults, or an encoder; ``None`` to pass
                ``user_embeds`` only.
            prior_model_name_or_path: The Stage C repo.
            decoder_model_name_or_path: The Stage B/A repo; ``None`` builds a prior-only pipeline
                (``output_type="latent"``).
            prior_subfolder: ``"prior"`` (3.6B) or ``"prior_lite"`` (1B).
            decoder_subfolder: ``"decoder"`` or ``"decoder_lite"``.
            load_image_encoder: Also load the CLIP image encoder for image prompts (``images=``).
            torch_dtype: dtype of every model, the encoder's unless ``preference_encoder_kwargs`` sets ``dtype``
                (Stable Cascade wants bfloat16 or float32; float16 gives black images).
            variant: Weight file variant, e.g. ``"bf16"``; a component without that variant loads its default
                weights (logged).
            revision: Revision of the Stage C repo.
            decoder_revision: Revision of the Stage B/A repo.
            user_adapter_kwargs: Extra arguments of ``load_user_adapter`` (e.g. ``subfolder``, ``revision``).
            preference_encoder_kwargs: Extra arguments of the encoder's ``from_pretrained`` (``dtype``, ``layer``...).
            resolution_multiple: Image pixels per Stage C latent pixel (Stable Cascade: 42.67).
            latent_dim_scale: Stage B latent pixels per Stage C latent pixel (Stable Cascade: 10.67).
            **hub_kwargs: ``token``, ``cache_dir``, ``local_files_only``, ``proxies``, ``force_download``.

        Examples:
            ```py
            pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
                "ppd-diffusers/ppd-stable-cascade-adapter", "ppd-diffusers/ppd-llava-onevision-encoder",
                torch_dtype=torch.bfloat16, variant="bf16",
            ).to("cuda")
            ```
        """
        from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        unknown = sorted(set(hub_kwargs) - set(_HUB_KWARGS))
        if unknown:
            raise TypeError(f"`from_stable_cascade` got unexpected arguments {unknown}; Hub arguments: {_HUB_KWARGS}.")
        prior_repo = dict(pretrained_model_name_or_path=prior_model_name_or_path, revision=revision, **hub_kwargs)
        weights = dict(torch_dtype=torch_dtype, variant=variant)
        components: dict[str, Any] = dict(
            prior=_load(StableCascadeUNet.from_pretrained, subfolder=prior_subfolder, **prior_repo, **weights),
            text_encoder=_load(
                CLIPTextModelWithProjection.from_pretrained, subfolder="text_encoder", **prior_repo, **_hf(weights)
            ),
            tokenizer=CLIPTokenizer.from_pretrained(subfolder="tokenizer", **prior_repo),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(subfolder="scheduler", **prior_repo),
        )
        if load_image_encoder:
            from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

            components["image_encoder"] = _load(
                CLIPVisionModelWithProjection.from_pretrained, subfolder="image_encoder", **prior_repo, **_hf(weights)
            )
            components["feature_extractor"] = AutoImageProcessor.from_pretrained(
                subfolder="feature_extractor", **prior_repo
            )
        if decoder_model_name_or_path is not None:
            from .paella import PaellaVQModel

            decoder_repo = dict(
                pretrained_model_name_or_path=decoder_model_name_or_path, revision=decoder_revision, **hub_kwargs
            )
            components["decoder"] = _load(
                StableCascadeUNet.from_pretrained, subfolder=decoder_subfolder, **decoder_repo, **weights
            )
            components["vqgan"] = _load(PaellaVQModel.from_pretrained, subfolder="vqgan", **decoder_repo, **weights)
            components["decoder_scheduler"] = DDPMWuerstchenScheduler.from_pretrained(
                subfolder="scheduler", **decoder_repo
            )
        if preference_encoder is not None and not isinstance(preference_encoder, BasePreferenceEncoder):
            encoder_kwargs = dict(preference_encoder_kwargs or {})
            if torch_dtype is not None:
                encoder_kwargs.setdefault("dtype", torch_dtype)
            preference_encoder = _load_encoder(os.fspath(preference_encoder), **encoder_kwargs)
        pipe = cls(
            **components,
            preference_encoder=preference_encoder,
            resolution_multiple=resolution_multiple,
            latent_dim_scale=latent_dim_scale,
        )
        if user_adapter is not None:
            pipe.load_user_adapter(user_adapter, **{**hub_kwargs, **(user_adapter_kwargs or {})})
        return pipe


def _hf(weights: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 names the dtype argument ``dtype``."""
    return {"dtype": weights["torch_dtype"], "variant": weights["variant"]}


def _load(load: Callable[..., Any], **kwargs: Any) -> Any:
    """Loads with the requested weight variant, or the default weights where that variant is not published."""
    if kwargs.get("variant") is None:
        return load(**{k: v for k, v in kwargs.items() if k != "variant"})
    try:
        return load(**kwargs)
    except OSError:
        where = f"{kwargs['pretrained_model_name_or_path']}/{kwargs.get('subfolder') or ''}"
        logger.info("No %r weights in %s: loading the default weights.", kwargs["variant"], where)
        return load(**{k: v for k, v in kwargs.items() if k != "variant"})


def _load_encoder(name_or_path: str, **kwargs: Any) -> BasePreferenceEncoder:
    from .encoder_base import _find_encoder_config
    from .preference_encoder import PreferenceEncoder

    saved = _find_encoder_config(name_or_path, kwargs.get("subfolder"), kwargs.get("revision")) is not None
    return (BasePreferenceEncoder if saved else PreferenceEncoder).from_pretrained(name_or_path, **kwargs)


def _load_adapter_file(path: str, subfolder: str | None, weight_name: str, **kwargs: Any) -> UserAdapter:
    """A ``UserAdapter`` from its ``config.json`` and a named safetensors file of the same folder."""
    import safetensors.torch

    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"`weight_name` must name a .safetensors file (pickles are not loaded), got {weight_name!r}.")
    hub = {k: kwargs.pop(k) for k in ("revision", *_HUB_KWARGS) if k in kwargs}
    if kwargs:
        raise TypeError(f"`load_user_adapter` with `weight_name` got unexpected arguments {sorted(kwargs)}.")
    config = UserAdapter.load_config(path, subfolder=subfolder, **hub)
    if os.path.isdir(path):
        file = os.path.join(path, subfolder or "", weight_name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No `{weight_name}` in {os.path.join(path, subfolder or '')}.")
    else:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(path, weight_name, subfolder=subfolder, **hub)
    adapter = UserAdapter.from_config(config)
    state = safetensors.torch.load_file(file)
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"`{weight_name}` does not hold this adapter's weights: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}."
        )
    return adapter
