"""``PersonalizedStageC``: a Stage C UNet and a ``UserAdapter`` run together, per-sample users."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNetOutput
from torch import nn

from ._stable_cascade import compile_blocks, stage_c_forward
from .adapter import UserAdapter, UserKeyValues
from .personalized_model import PersonalizedModel

__all__ = ["PersonalizedStageC"]


class PersonalizedStageC(PersonalizedModel):
    r"""Runs a Stage C ``StableCascadeUNet`` with a ``UserAdapter``, conditioning each sample on its user.

    The UNet's weights are never changed. Like peft with its base models, this freezes the UNet
    (``requires_grad_(False)``) and keeps it in ``eval()`` even when ``train()`` is called: its dropout
    would otherwise give the DPO reference and policy passes different masks. Without a user
    (``user_embeds=None``), with ``user_scale=0`` or with a freshly initialised adapter the output equals
    ``unet(...)`` bit for bit for the same inputs. User keys/values travel as arguments, so gradient
    checkpointing (``unet.enable_gradient_checkpointing()``) recomputes blocks with the right user.

    Args:
        unet: The Stage C UNet.
        adapter: A ``UserAdapter`` built for this UNet (checked: a mismatch raises ``ValueError``). It may be
            wrapped by ``accelerate``/DDP, so that only the adapter is distributed and checkpointed.

    Examples:
        >>> import torch
        >>> from diffusers import StableCascadeUNet
        >>> unet = StableCascadeUNet(
        ...     block_out_channels=(32, 32), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        ...     up_num_layers_per_block=(1, 1), conditioning_dim=32, clip_text_pooled_in_channels=16,
        ...     clip_text_in_channels=16, clip_image_in_channels=16, in_channels=4, out_channels=4,
        ...     switch_level=(False,))
        >>> model = UserAdapter.from_model(unet, user_embed_dim=24).attach(unet)
        >>> sample, t, pooled = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 1, 16)
        >>> users = torch.randn(2, 1, 24)  # a different user for each sample
        >>> out = model(sample, t, pooled, user_embeds=users).sample
        >>> torch.equal(out, unet(sample, t, pooled).sample)  # a fresh adapter changes nothing
        True
    """

    def __init__(self, unet: StableCascadeUNet, adapter: UserAdapter | nn.Module):
        super().__init__(unet, adapter)

    @property
    def unet(self) -> StableCascadeUNet:
        """The Stage C UNet (``model``)."""
        return self.model

    def forward(
        self,
        sample: torch.Tensor,
        timestep_ratio: torch.Tensor | float,
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor | None = None,
        clip_img: torch.Tensor | None = None,
        *,
        user_embeds: torch.Tensor | None = None,
        user_kv: UserKeyValues | None = None,
        user_scale: float | torch.Tensor = 1.0,
        user_rows: int | slice | None = None,
        return_dict: bool = True,
        **unet_kwargs: torch.Tensor | float | None,
    ) -> StableCascadeUNetOutput | tuple[torch.Tensor]:
        """Predicts the noise of ``sample`` for each sample's user.

        Args:
            sample: Noisy Stage C latents ``(batch, channels, height, width)``.
            timestep_ratio: ``t`` in [0, 1], a float or a ``(batch,)`` tensor.
            clip_text_pooled: Pooled CLIP text embeddings, ``(batch, 1, channels)`` or ``(batch, channels)``.
            clip_text: CLIP text hidden states ``(batch, tokens, channels)``. Without ``clip_img`` a zero image
                embedding is supplied so that the text tokens are used (plain diffusers drops them then).
            clip_img: CLIP image embeddings ``(batch, images, channels)``.
            user_embeds: User embeddings, ``(batch, tokens, user_embed_dim)``; row ``b`` conditions sample ``b``
                (a single row conditions every sample that has a user). ``None`` runs the base model.
            user_kv: Precomputed ``adapter(user_embeds, user_scale=...)``; pass it instead of ``user_embeds`` to
                compute the user keys/values once per generation rather than at every step.
            user_scale: With ``user_embeds``: weight of the user term, a float or a ``(batch,)`` tensor (0
                gives the base model for that sample). ``user_kv`` carries its own scale.
            return_dict: Return a ``StableCascadeUNetOutput`` rather than a tuple.
            **unet_kwargs: ``effnet``, ``pixels``, ``sca``, ``crp`` as in ``StableCascadeUNet.forward``.

        Returns:
            ``StableCascadeUNetOutput`` with ``.sample``, or ``(sample,)`` when ``return_dict=False``.
        """
        user_kv = self.user_key_values(sample.shape[0], user_embeds, user_kv, user_scale, user_rows)
        keys = values = None
        if user_kv is not None:
            keys, values, user_rows = user_kv.keys, user_kv.values, user_kv.rows
        out = stage_c_forward(
            self.unet,
            sample,
            timestep_ratio,
            clip_text_pooled,
            clip_text,
            clip_img,
            user_keys=keys,
            user_values=values,
            user_rows=user_rows,
            **unet_kwargs,
        )
        return out if return_dict else (out.sample,)

    def compile_repeated_blocks(self, **compile_kwargs: Any) -> PersonalizedStageC:
        """Compiles the UNet's blocks and the personalized attention in place (regional compilation).

        The counterpart of diffusers' ``ModelMixin.compile_repeated_blocks``: every residual, timestep and
        attention block of the UNet gets ``torch.compile(**compile_kwargs)`` (static shapes unless
        ``dynamic`` is given). Repeated blocks share their compiled code, so compiling takes seconds rather
        than minutes, and a step is traced without graph breaks. Another user or scale with the same shapes
        does not recompile; a new batch size, number of user rows, or one user broadcast instead of one
        per row compiles once more (up to ``RECOMPILE_LIMIT`` variants per block class). The plain
        ``unet(...)`` runs compiled too. The personalized attention module is shared by every model in
        the process, so it stays compiled for all of them, with the latest ``compile_kwargs``.

        Args:
            **compile_kwargs: Passed to ``torch.compile`` (e.g. ``fullgraph=True``, ``mode=...``).

        Returns:
            ``self``.
        """
        compile_blocks(self.unet, **compile_kwargs)
        return self
