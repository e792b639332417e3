"""``PPDLoaderMixin``: the user side of every PPD pipeline (adapter loading, user scale, user encoding and keys/values,
one-call construction), whatever the backbone it personalizes."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .adapter import UserAdapter, UserKeyValues
from .encoder_base import BasePreferenceEncoder

if TYPE_CHECKING:
    from .personalized_model import PersonalizedModel
    from .pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

__all__ = [
    "DEFAULT_ADAPTER_NAME",
    "PPDLoaderMixin",
    "check_adapter_fits_encoder",
    "check_user_components",
    "diffusers_dtype_kwargs",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

STABLE_CASCADE_PRIOR = "stabilityai/stable-cascade-prior"
STABLE_CASCADE = "stabilityai/stable-cascade"
DEFAULT_ADAPTER_NAME = "default"
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


def check_user_components(pipeline: type, user_adapter: Any, preference_encoder: Any) -> None:
    """The checks of a PPD pipeline's ``__init__``: the user components are loaded objects of the right classes
    (diffusers hands ``from_pretrained(base, user_adapter="an id")`` over as a string) and fit each other."""
    for name, value, kind in (
        ("user_adapter", user_adapter, UserAdapter),
        ("preference_encoder", preference_encoder, BasePreferenceEncoder),
    ):
        if value is not None and not isinstance(value, kind):
            raise ValueError(
                f"`{name}` must be a `{kind.__name__}`, got {type(value).__name__}: load an id or folder with "
                f"`{pipeline.__name__}.from_base_model(base, {name}=...)`."
            )
    check_adapter_fits_encoder(user_adapter, preference_encoder)


def diffusers_dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The dtype argument of the installed diffusers' ``from_pretrained``: ``dtype`` from 0.40 on (which deprecates
    ``torch_dtype`` for pipelines), ``torch_dtype`` before (0.38 and 0.39 pass an unknown ``dtype`` on to the
    model's ``__init__``). Empty for ``None``."""
    if dtype is None:
        return {}
    from importlib.metadata import version

    from packaging.version import Version

    return {"dtype" if Version(version("diffusers")).release >= (0, 40) else "torch_dtype": dtype}


def resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """The one dtype of ``dtype`` (the name current diffusers and transformers prefer) and ``torch_dtype``.

    Raises:
        ValueError: Both are given.

    Examples:
        >>> resolve_dtype(None, torch.bfloat16), resolve_dtype(torch.float32, None)
        (torch.bfloat16, torch.float32)
    """
    if dtype is not None and torch_dtype is not None:
        raise ValueError("Pass either `dtype` or `torch_dtype` (its older name), not both.")
    return dtype if dtype is not None else torch_dtype


class PPDLoaderMixin:
    """The user side of a PPD pipeline, shared by the Stable Cascade, SDXL and Flux pipelines.

    A pipeline using it registers the components ``user_adapter`` and ``preference_encoder``, names the component
    the adapter personalizes in ``_user_model_name`` (``"prior"``, ``"unet"`` or ``"transformer"``) and calls
    ``_attach_user_adapter()`` at the end of its ``__init__``. The adapter is attached to that model once, when it is
    loaded (``personalized_model``): a call only computes the user keys/values (``prepare_user_kv``) and hands
    them to the personalized model.

    One adapter at a time: ``adapter_name`` exists for diffusers' loader signature, and any name other than
    ``"default"`` is refused.
    """

    _user_model_name: str
    # compile kwargs of a whole-graph compiled personalized model, applied again to the model of a new adapter
    _personalized_compile_kwargs: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------------
    # the attached adapter

    @property
    def user_model(self) -> torch.nn.Module:
        """The component the user adapter personalizes (``getattr(self, self._user_model_name)``)."""
        return getattr(self, self._user_model_name)

    @property
    def personalized_model(self) -> PersonalizedModel | None:
        """The user model and the loaded adapter run together (``adapter.attach(model)``), or ``None``."""
        return getattr(self, "_personalized_model", None)

    def _attach_user_adapter(self) -> None:
        """Attaches ``user_adapter`` to the user model (checking the fit, freezing it and, for SDXL/Flux,
        installing the user attention processors once), after detaching a previously attached adapter."""
        previous = self.personalized_model
        if previous is not None:
            previous.detach()
        self._personalized_model = None
        if self.user_adapter is None:
            return
        model = self.user_adapter.attach(self.user_model)
        if self._personalized_compile_kwargs is not None:
            model.compile(**self._personalized_compile_kwargs)
        self._personalized_model = model

    def load_user_adapter(
        self,
        pretrained_model_name_or_path_or_adapter: str | os.PathLike | UserAdapter,
        subfolder: str | None = None,
        weight_name: str | None = None,
        adapter_name: str | None = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        """Loads a trained ``UserAdapter`` into the pipeline and attaches it (replacing any loaded one).

        Args:
            pretrained_model_name_or_path_or_adapter: A Hub id or folder written by ``UserAdapter.save_pretrained``,
                or a ``UserAdapter``.
            subfolder: Where the adapter lies inside the repo or folder.
            weight_name: A safetensors file to read instead of ``diffusion_pytorch_model.safetensors`` (the
                folder's ``config.json`` still describes the adapter).
            adapter_name: Only ``None`` or ``"default"``: a pipeline holds one adapter; other names raise
                ``ValueError`` rather than being ignored.
            dtype: The adapter's dtype; by default the personalized model's. The user keys/values are computed
                once per call, so a lower precision costs nothing per step.
            torch_dtype: The older name of ``dtype`` (not both).
            **kwargs: Hub arguments (``revision``, ``token``, ``cache_dir``, ``local_files_only``...) and, without
                ``weight_name``, anything ``UserAdapter.from_pretrained`` takes (e.g. ``variant``).

        Raises:
            ValueError: The adapter does not fit the model or the preference encoder (the message names both), or
                ``adapter_name`` names a second adapter.
        """
        if adapter_name not in (None, DEFAULT_ADAPTER_NAME):
            raise ValueError(
                f"`adapter_name={adapter_name!r}`: a PPD pipeline holds one user adapter at a time (named "
                f"{DEFAULT_ADAPTER_NAME!r}); load another one to replace it, or keep several pipelines."
            )
        dtype = resolve_dtype(dtype, torch_dtype)
        source = pretrained_model_name_or_path_or_adapter
        if isinstance(source, UserAdapter):
            adapter = source
        elif weight_name is not None:
            adapter = _load_adapter_file(os.fspath(source), subfolder, weight_name, **kwargs)
        else:
            adapter = UserAdapter.from_pretrained(source, subfolder=subfolder, **kwargs)
        model = self.user_model
        adapter.check_model(model)
        check_adapter_fits_encoder(adapter, self.preference_encoder)
        dtype = dtype or model.dtype
        # an offloaded model sits on the CPU or the meta device: keep the adapter's weights on the CPU then
        device = model.device if model.device.type != "meta" else torch.device("cpu")
        adapter = adapter.to(device) if adapter.device != device else adapter
        adapter = (adapter.to(dtype) if adapter.dtype != dtype else adapter).eval()
        self.register_modules(user_adapter=adapter)
        self._attach_user_adapter()
        self._reapply_model_offload()

    def unload_user_adapter(self) -> None:
        """Detaches and removes the user adapter: the pipeline becomes its base model (users are then refused).

        The model's own attention processors come back (SDXL, Flux) and the user scale returns to 1.
        """
        self.register_modules(user_adapter=None)
        self._attach_user_adapter()
        self._user_scale = 1.0

    def set_user_adapter_scale(self, user_scale: float) -> None:
        """Sets the default weight of the user term (a call's ``user_scale`` overrides it).

        ``0`` gives the base model, ``1`` the trained adapter; values in between (or above) weaken (or
        strengthen) the user's influence.
        """
        if isinstance(user_scale, bool) or not isinstance(user_scale, int | float):
            raise ValueError(f"`user_scale` must be a number, got {user_scale!r}.")
        self._user_scale = float(user_scale)

    @property
    def user_scale(self) -> float:
        """The default user scale set by ``set_user_adapter_scale`` (1.0 unless set)."""
        return getattr(self, "_user_scale", 1.0)

    @property
    def user_adapter_scale(self) -> float:
        """Deprecated name of ``user_scale``."""
        warnings.warn("`user_adapter_scale` is now `user_scale`.", FutureWarning, stacklevel=2)
        return self.user_scale

    def _reapply_model_offload(self) -> None:
        # a component registered after `enable_model_cpu_offload` has no hook: rebuild the hook chain
        if getattr(self, "_all_hooks", None):
            self.enable_model_cpu_offload(device=self._offload_device)

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

    def prepare_user_kv(
        self,
        user_embeds: torch.Tensor,
        user_scale: float | Sequence[float] | None,
        batch_size: int,
        num_images_per_prompt: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
        rows: int | slice | None = None,
    ) -> UserKeyValues:
        """The user keys/values of one generation, computed once and reused at every step.

        One user (or one scale) serves every prompt, and each prompt's user serves its ``num_images_per_prompt``
        images; the adapter then runs once, where its weights are (on ``device`` when it is offloaded), and the
        result is moved to the personalized model.

        Args:
            user_embeds: ``(1 or batch_size, tokens, user_embed_dim)`` user embeddings.
            user_scale: Weight of the user term, one number or one per prompt; ``None`` for ``user_scale``.
            batch_size: Prompts of the call.
            num_images_per_prompt: Images per prompt.
            device: The pipeline's execution device.
            dtype: The dtype of the keys/values; by default the personalized model's.
            rows: Which rows of the model's batch have a user (``UserKeyValues.rows``): e.g. how many leading rows
                of a guidance batch, or ``slice(b, None)`` for the conditional half of ``[negative, positive]``.

        Returns:
            ``UserKeyValues`` of ``batch_size * num_images_per_prompt`` users, for ``rows``.
        """
        if user_scale is None:
            user_scale = self.user_scale
        scales = torch.tensor(
            user_scale if isinstance(user_scale, list | tuple) else [user_scale], dtype=torch.float32
        )
        scales = scales.expand(batch_size).repeat_interleave(num_images_per_prompt)
        user_embeds = user_embeds.expand(batch_size, -1, -1).repeat_interleave(num_images_per_prompt, dim=0)
        # an offloaded adapter's hook moves it (and its inputs) to the execution device; otherwise it runs where
        # its weights are, which may differ from the model's device when components are spread over devices
        runs_on = device if _is_offloaded(self.user_adapter) else self.user_adapter.device
        user_kv = self.user_adapter(user_embeds.to(runs_on), user_scale=scales.to(runs_on))
        model = self.user_model
        model_device = device if _is_offloaded(model) else model.device
        return user_kv.to(device=model_device, dtype=dtype or model.dtype).for_rows(rows)

    # ------------------------------------------------------------------------------------------------------
    # one-call construction

    @classmethod
    def from_base_model(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        user_adapter: str | os.PathLike | UserAdapter | None = None,
        preference_encoder: str | os.PathLike | BasePreferenceEncoder | None = None,
        *,
        user_adapter_kwargs: dict[str, Any] | None = None,
        preference_encoder_kwargs: dict[str, Any] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> Any:
        """Builds the pipeline from a base model's diffusers repo, a user adapter and a preference encoder.

        ``cls.from_pretrained(pretrained_model_name_or_path, **from_pretrained_kwargs)`` loads the base model (a
        repo without the PPD components gets none), then ``load_user_adapter`` loads and attaches the adapter.

        Args:
            pretrained_model_name_or_path: The base pipeline's Hub id or folder (e.g. an SDXL or Flux repo, or a
                saved PPD pipeline whose adapter ``user_adapter`` replaces).
            user_adapter: Hub id or folder of a ``UserAdapter`` (or one already loaded); ``None`` for none.
            preference_encoder: Hub id or folder of a saved preference encoder, the id of a LLaVA-OneVision
                model to wrap with ``PreferenceEncoder`` defaults, or an encoder; ``None`` to pass ``user_embeds``
                only.
            user_adapter_kwargs: Extra arguments of ``load_user_adapter`` (e.g. ``subfolder``, ``revision``).
            preference_encoder_kwargs: Extra arguments of the encoder's ``from_pretrained`` (``dtype``, ``layer``...).
            **from_pretrained_kwargs: Arguments of ``from_pretrained``: ``dtype`` (or its older name
                ``torch_dtype``, not both; also the encoder's unless ``preference_encoder_kwargs`` sets one),
                ``variant``, ``revision``, Hub arguments (also used for the adapter)...

        Examples:
            ```py
            pipe = PersonalizedStableCascadePipeline.from_base_model(
                "my-saved-ppd-pipeline", "me/my-newer-adapter", dtype=torch.bfloat16
            ).to("cuda")
            ```
        """
        dtype = resolve_dtype(
            from_pretrained_kwargs.pop("dtype", None), from_pretrained_kwargs.pop("torch_dtype", None)
        )
        from_pretrained_kwargs.update(diffusers_dtype_kwargs(dtype))
        encoder = _resolve_encoder(preference_encoder, dtype, preference_encoder_kwargs)
        if encoder is not None:
            from_pretrained_kwargs["preference_encoder"] = encoder
        pipe = cls.from_pretrained(pretrained_model_name_or_path, **from_pretrained_kwargs)
        hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
        _load_adapter_into(pipe, user_adapter, hub_kwargs, user_adapter_kwargs)
        return pipe

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
        dtype: torch.dtype | None = None,
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
        """Builds the Stable Cascade pipeline from Stability's repos, a user adapter and a preference encoder.

        Stage C (prior, CLIP text encoder, tokenizer, scheduler, optionally the CLIP image encoder) comes from
        ``stabilityai/stable-cascade-prior``; Stage B and A (decoder, VQGAN, scheduler) from
        ``stabilityai/stable-cascade``. Both stages use the same CLIP text encoder, so it is loaded once. (Stability
        publishes no single diffusers repo with both stages: ``from_base_model`` takes a saved PPD pipeline.)

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
            dtype: dtype of every model, the encoder's unless ``preference_encoder_kwargs`` sets ``dtype``
                (Stable Cascade wants bfloat16 or float32; float16 gives black images).
            torch_dtype: The older name of ``dtype`` (not both).
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
                dtype=torch.bfloat16, variant="bf16",
            ).to("cuda")
            ```
        """
        from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        unknown = sorted(set(hub_kwargs) - set(_HUB_KWARGS))
        if unknown:
            raise TypeError(f"`from_stable_cascade` got unexpected arguments {unknown}; Hub arguments: {_HUB_KWARGS}.")
        dtype = resolve_dtype(dtype, torch_dtype)
        prior_repo = dict(pretrained_model_name_or_path=prior_model_name_or_path, revision=revision, **hub_kwargs)
        weights = dict(dtype=dtype, variant=variant)  # transformers (5) takes `dtype`
        diffusers_weights = dict(**diffusers_dtype_kwargs(dtype), variant=variant)
        components: dict[str, Any] = dict(
            prior=_load(
                StableCascadeUNet.from_pretrained, subfolder=prior_subfolder, **prior_repo, **diffusers_weights
            ),
            text_encoder=_load(
                CLIPTextModelWithProjection.from_pretrained, subfolder="text_encoder", **prior_repo, **weights
            ),
            tokenizer=CLIPTokenizer.from_pretrained(subfolder="tokenizer", **prior_repo),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(subfolder="scheduler", **prior_repo),
        )
        if load_image_encoder:
            from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

            components["image_encoder"] = _load(
                CLIPVisionModelWithProjection.from_pretrained, subfolder="image_encoder", **prior_repo, **weights
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
                StableCascadeUNet.from_pretrained, subfolder=decoder_subfolder, **decoder_repo, **diffusers_weights
            )
            components["vqgan"] = _load(
                PaellaVQModel.from_pretrained, subfolder="vqgan", **decoder_repo, **diffusers_weights
            )
            components["decoder_scheduler"] = DDPMWuerstchenScheduler.from_pretrained(
                subfolder="scheduler", **decoder_repo
            )
        pipe = cls(
            **components,
            preference_encoder=_resolve_encoder(preference_encoder, dtype, preference_encoder_kwargs),
            resolution_multiple=resolution_multiple,
            latent_dim_scale=latent_dim_scale,
        )
        _load_adapter_into(pipe, user_adapter, hub_kwargs, user_adapter_kwargs)
        return pipe


def _resolve_encoder(
    encoder: str | os.PathLike | BasePreferenceEncoder | None,
    dtype: torch.dtype | None,
    encoder_kwargs: dict[str, Any] | None,
) -> BasePreferenceEncoder | None:
    """The preference encoder of a one-call constructor: as given, or loaded (in ``dtype`` unless its kwargs say)."""
    if encoder is None or isinstance(encoder, BasePreferenceEncoder):
        return encoder
    encoder_kwargs = dict(encoder_kwargs or {})
    if dtype is not None:
        encoder_kwargs.setdefault("dtype", dtype)
    return _load_encoder(os.fspath(encoder), **encoder_kwargs)


def _load_adapter_into(
    pipe: PPDLoaderMixin,
    adapter: str | os.PathLike | UserAdapter | None,
    hub_kwargs: dict[str, Any],
    adapter_kwargs: dict[str, Any] | None,
) -> None:
    if adapter is not None:
        pipe.load_user_adapter(adapter, **{**hub_kwargs, **(adapter_kwargs or {})})


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


def _is_offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate hooks (model or sequential CPU offload) decide where ``module`` runs."""
    return getattr(module, "_hf_hook", None) is not None or module.device.type == "meta"


def _onload(module: torch.nn.Module) -> None:
    """Runs a model-offload hook that only fires on ``forward`` (what diffusers' ``apply_forward_hook`` does
    for methods like ``vqgan.decode``), for modules used through other entry points."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)
