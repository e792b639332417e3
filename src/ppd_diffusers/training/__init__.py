"""Training helpers. Imported on demand only: ``import ppd_diffusers`` never loads this package."""

from .dpo_step import ppd_dpo_step

__all__ = ["ppd_dpo_step"]
