"""What the SDXL and Flux pipelines share: the user rides on attention processors that diffusers may replace.

diffusers' IP-Adapter methods recognise processors by class (``set_ip_adapter_scale``) or rebuild them from
their class (``unload_ip_adapter``), so they must never see the user processors. ``UserProcessorsMixin`` runs
such methods on the model's own processors and wraps whatever processors they leave.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .user_attention_processor import remove_user_processors, user_processor_layers

__all__ = ["UserProcessorsMixin", "prompt_count"]


class UserProcessorsMixin:
    """Keeps a pipeline's user processors through diffusers' processor-replacing methods (put it first in the bases,
    before the diffusers pipeline; the pipeline also needs ``PPDLoaderMixin``)."""

    @contextmanager
    def _user_processors_lifted(self) -> Iterator[None]:
        """Runs the body on the model's own processors, then wraps whatever processors it leaves."""
        if self.user_adapter is None:
            yield
            return
        remove_user_processors(self.user_model)
        try:
            yield
        finally:
            self._attach_user_adapter()

    def _ensure_user_processors(self) -> None:
        """Wraps the model's processors again if something replaced them since the adapter was attached (e.g.
        ``unet.set_attn_processor``): a user is never dropped silently."""
        wrapped = {name for name, _ in user_processor_layers(self.user_model)}
        if wrapped != set(self.user_adapter.config.layer_names):
            self._attach_user_adapter()

    def load_ip_adapter(self, *args: Any, **kwargs: Any) -> None:
        """The diffusers pipeline's ``load_ip_adapter``; the user processors then wrap the IP-Adapter's, so a user
        and an image prompt act together (the user term is added after the IP-Adapter's processor ran)."""
        with self._user_processors_lifted():
            super().load_ip_adapter(*args, **kwargs)

    def unload_ip_adapter(self) -> None:
        """The diffusers pipeline's ``unload_ip_adapter``, keeping the user adapter."""
        with self._user_processors_lifted():
            super().unload_ip_adapter()

    def set_ip_adapter_scale(self, scale: Any) -> None:
        """The diffusers pipeline's ``set_ip_adapter_scale`` (it finds the IP-Adapter processors by class)."""
        with self._user_processors_lifted():
            super().set_ip_adapter_scale(scale)


def prompt_count(prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
    """How many prompts a call has, as diffusers' pipelines count them (``ValueError`` for neither).

    Examples:
        >>> prompt_count("a cat", None), prompt_count(["a", "b"], None)
        (1, 2)
    """
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt:
        return len(prompt)
    if prompt is None and isinstance(prompt_embeds, torch.Tensor):
        return prompt_embeds.shape[0]
    raise ValueError(
        f"`prompt` must be a string or a non-empty list of strings (or pass `prompt_embeds`), got {prompt!r}."
    )
