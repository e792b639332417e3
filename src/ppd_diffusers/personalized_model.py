"""``PersonalizedModel``: a diffusion backbone and a ``UserAdapter`` run together, a user per sample.

One object for the three backbones: ``adapter.attach(model)`` (or ``PersonalizedModel.for_model``) checks the fit
once, freezes the model and, for SDXL and Flux, installs the user attention processors once. Each call then
computes the user keys/values (or takes precomputed ones) and hands them to the model as an argument.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter import UserAdapter, UserKeyValues
from .backbones import backbone_of
from .user_attention_processor import (
    USER_KV_KWARG,
    install_user_processors,
    remove_user_processors,
    runs_user_processors,
)

__all__ = ["PersonalizedModel", "attention_kwargs_name"]

# the forward argument through which each processor-based backbone hands kwargs to its attention processors
_ATTENTION_KWARGS = {"sdxl": "cross_attention_kwargs", "flux": "joint_attention_kwargs"}


def attention_kwargs_name(backbone: str) -> str:
    """``"cross_attention_kwargs"`` (SDXL) or ``"joint_attention_kwargs"`` (Flux): how user keys/values reach the
    attention processors of a ``backbone`` model."""
    if backbone not in _ATTENTION_KWARGS:
        raise ValueError(f"The {backbone!r} backbone takes no attention kwargs; it has its own personalized forward.")
    return _ATTENTION_KWARGS[backbone]


class PersonalizedModel(nn.Module):
    r"""Runs a diffusion model with a ``UserAdapter``, conditioning each sample on its user.

    The model's weights are never changed. Like peft with its base models, this freezes the model
    (``requires_grad_(False)``) and keeps it in ``eval()`` even when ``train()`` is called: its dropout would
    otherwise give the DPO reference and policy passes different masks. Without a user (``user_embeds=None``),
    with ``user_scale=0`` or with a freshly initialised adapter the output equals the model's bit for bit for the
    same inputs. User keys/values travel as arguments, so gradient checkpointing recomputes blocks with the right
    user.

    ``forward`` takes the model's own arguments (``model(sample, timestep, encoder_hidden_states, ...)`` for
    SDXL, ``hidden_states=..., timestep=...`` for Flux) plus the user arguments below. Stage C models get the
    subclass ``PersonalizedStageC``, whose forward has Stage C's arguments.

    Args:
        model: The backbone (see ``backbones``).
        adapter: A ``UserAdapter`` built for it (checked: a mismatch raises ``ValueError``). It may be wrapped by
            ``accelerate``/DDP, so that only the adapter is distributed and checkpointed.

    Examples:
        >>> import torch
        >>> from ppd_diffusers.testing_utils import tiny_sdxl_unet
        >>> unet = tiny_sdxl_unet()
        >>> model = UserAdapter.from_model(unet, user_embed_dim=24).attach(unet)
        >>> inputs = dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor([10, 500]),
        ...     encoder_hidden_states=torch.randn(2, 7, 32),
        ...     added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)})
        >>> out = model(**inputs, user_embeds=torch.randn(2, 1, 24)).sample  # a user per sample
        >>> torch.equal(out, unet(**inputs).sample)  # a fresh adapter changes nothing
        True
    """

    def __init__(self, model: nn.Module, adapter: UserAdapter | nn.Module):
        super().__init__()
        unwrapped = _unwrap(adapter)
        unwrapped.check_model(model)
        self._adapter_config = unwrapped.config
        self.backbone = backbone_of(model)
        self.model = model.requires_grad_(False).eval()
        self.adapter = adapter
        self._layer_names = list(unwrapped.config.layer_names or [])
        # a plain list: the layers stay submodules of `model` only
        self._user_layers: list[nn.Module] = []
        if self.backbone != "stable_cascade":
            install_user_processors(model, self._layer_names)
            unwrapped_model = getattr(model, "_orig_mod", model)
            self._user_layers = [unwrapped_model.get_submodule(name) for name in self._layer_names]

    @classmethod
    def for_model(cls, model: nn.Module, adapter: UserAdapter | nn.Module) -> PersonalizedModel:
        """The personalized model of ``model``'s backbone: a ``PersonalizedStageC`` for Stage C, else this class."""
        if backbone_of(model) == "stable_cascade":
            from .personalized_unet import PersonalizedStageC

            return PersonalizedStageC(model, adapter)
        return cls(model, adapter)

    def train(self, mode: bool = True) -> PersonalizedModel:
        """Sets the adapter's mode; the frozen model stays in ``eval()``."""
        super().train(mode)
        self.model.eval()
        return self

    def detach(self) -> nn.Module:
        """Returns the base model (frozen, in eval mode, weights as loaded) with its own attention processors back.

        The processors belong to the model, so this also takes them from any other ``PersonalizedModel`` of the
        same model; such a model installs them again at its next call with a user.
        """
        if self.backbone != "stable_cascade":
            remove_user_processors(self.model)
        return self.model

    def user_key_values(
        self,
        batch_size: int,
        user_embeds: torch.Tensor | None = None,
        user_kv: UserKeyValues | None = None,
        user_scale: float | torch.Tensor = 1.0,
        user_rows: int | slice | None = None,
    ) -> UserKeyValues | None:
        """The checked user keys/values of a call with ``batch_size`` rows (``None``: no user)."""
        if user_embeds is not None and user_kv is not None:
            raise ValueError("Pass either `user_embeds` or `user_kv`, not both.")
        if user_kv is not None and not (isinstance(user_scale, float | int) and user_scale == 1):
            raise ValueError(
                "`user_kv` already carries its scale: compute it with `adapter(user_embeds, user_scale=...)` instead "
                "of passing `user_scale`."
            )
        if user_embeds is not None:
            user_kv = self.adapter(user_embeds, user_scale=user_scale)
        if user_kv is None:
            return None
        if user_rows is not None:
            user_kv = user_kv.for_rows(user_rows)
        from .attention import user_row_slice

        rows = user_row_slice(user_kv.rows, batch_size)
        layers = len(self._adapter_config.block_channels)
        if len(user_kv.keys) != layers or len(user_kv.values) != layers:
            raise ValueError(
                f"`user_kv` holds {len(user_kv.keys)} layers, but the model has {layers} personalized attention "
                "layers: compute it with the adapter attached here."
            )
        count = rows.stop - rows.start
        if user_kv.batch_size not in (1, count) or user_kv.values[0].shape[0] not in (1, count):
            raise ValueError(
                f"`user_embeds`/`user_kv` has {user_kv.batch_size} users for {count} samples with a user: "
                "pass one user per sample, or a single user for all of them."
            )
        return user_kv

    def forward(
        self,
        *args: Any,
        user_embeds: torch.Tensor | None = None,
        user_kv: UserKeyValues | None = None,
        user_scale: float | torch.Tensor = 1.0,
        user_rows: int | slice | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the model on its own arguments, each sample conditioned on its user.

        Args:
            *args: The model's positional arguments (its first is the noisy sample).
            user_embeds: User embeddings ``(users, tokens, user_embed_dim)``: one per row with a user, or one for
                all of them. ``None`` runs the base model.
            user_kv: Precomputed ``adapter(user_embeds, user_scale=...)``; pass it instead of ``user_embeds`` to
                compute the user keys/values once per generation rather than at every step.
            user_scale: With ``user_embeds``: weight of the user term, a float or a per-user ``(users,)`` tensor
                (0 gives the base model for that sample). ``user_kv`` carries its own scale.
            user_rows: Which rows of the batch have a user: ``None`` (all, or what ``user_kv.rows`` says), how
                many leading rows, or a slice. The other rows run the base model.
            **kwargs: The model's keyword arguments.

        Returns:
            What the model returns.
        """
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        user_kv = self.user_key_values(sample.shape[0], user_embeds, user_kv, user_scale, user_rows)
        if user_kv is not None:
            if not runs_user_processors(self._user_layers):
                # something replaced the processors since attaching: wrap the current ones, never drop the user
                install_user_processors(self.model, self._layer_names)
            name = attention_kwargs_name(self.backbone)
            kwargs[name] = {**(kwargs.get(name) or {}), USER_KV_KWARG: user_kv}
        return self.model(*args, **kwargs)


def _unwrap(module: nn.Module) -> UserAdapter:
    """The ``UserAdapter`` inside a DDP/accelerate wrapper (``.module``) or the module itself."""
    while not isinstance(module, UserAdapter) and hasattr(module, "module"):
        module = module.module
    if not isinstance(module, UserAdapter):
        raise TypeError(f"`adapter` must be a `UserAdapter` (possibly wrapped by accelerate), got {type(module)}.")
    return module
