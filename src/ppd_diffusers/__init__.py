"""ppd-diffusers: Personalized Preference fine-tuning of Diffusion models (PPD) for Stable Cascade, SDXL and Flux.

Public names are imported lazily (PEP 562), so ``import ppd_diffusers`` costs nothing until a name is
used; training-only and evaluation-only code is never imported by the package itself.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("ppd-diffusers")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# public name -> submodule that defines it
_LAZY_NAMES = {
    "BasePreferenceEncoder": "encoder_base",
    "CLIPPreferenceEncoder": "clip_preference_encoder",
    "PreferenceEncoder": "preference_encoder",
    "PreferencePair": "preference_pairs",
    "UserEmbeddingCache": "embedding_cache",
    "UserAdapter": "adapter",
    "UserKeyValues": "adapter",
    "PersonalizedModel": "personalized_model",
    "PersonalizedStageC": "personalized_unet",
    "PersonalizedFluxPipeline": "pipeline_personalized_flux",
    "PersonalizedFluxPipelineOutput": "pipeline_personalized_flux",
    "PersonalizedStableDiffusionXLPipeline": "pipeline_personalized_stable_diffusion_xl",
    "PersonalizedStableDiffusionXLPipelineOutput": "pipeline_personalized_stable_diffusion_xl",
    "PersonalizedStableCascadePipeline": "pipeline_personalized_stable_cascade",
    "PersonalizedStableCascadePipelineOutput": "pipeline_personalized_stable_cascade",
    "PaellaVQModel": "paella",
    "StageCImageEncoder": "stage_c_image_encoder",
    "load_preference_pairs": "preference_pairs",
    "decoupled_attention": "attention",
    "PPDLoss": "loss",
    "PPDLossOutput": "loss",
    "ppd_loss": "loss",
    "add_noise": "noise",
    "alphas_cumprod": "noise",
    "sample_timesteps": "noise",
    "timestep_weight": "noise",
}

__all__ = [
    "BasePreferenceEncoder",
    "CLIPPreferenceEncoder",
    "PPDLoss",
    "PPDLossOutput",
    "PaellaVQModel",
    "PersonalizedStableCascadePipeline",
    "PersonalizedStableCascadePipelineOutput",
    "PersonalizedFluxPipeline",
    "PersonalizedFluxPipelineOutput",
    "PersonalizedModel",
    "PersonalizedStableDiffusionXLPipeline",
    "PersonalizedStableDiffusionXLPipelineOutput",
    "PersonalizedStageC",
    "PreferenceEncoder",
    "PreferencePair",
    "StageCImageEncoder",
    "UserAdapter",
    "UserEmbeddingCache",
    "UserKeyValues",
    "__version__",
    "add_noise",
    "alphas_cumprod",
    "decoupled_attention",
    "load_preference_pairs",
    "ppd_loss",
    "sample_timesteps",
    "timestep_weight",
]

if TYPE_CHECKING:
    from .adapter import UserAdapter, UserKeyValues
    from .attention import decoupled_attention
    from .clip_preference_encoder import CLIPPreferenceEncoder
    from .embedding_cache import UserEmbeddingCache
    from .encoder_base import BasePreferenceEncoder
    from .loss import PPDLoss, PPDLossOutput, ppd_loss
    from .noise import add_noise, alphas_cumprod, sample_timesteps, timestep_weight
    from .paella import PaellaVQModel
    from .personalized_model import PersonalizedModel
    from .personalized_unet import PersonalizedStageC
    from .pipeline_personalized_flux import PersonalizedFluxPipeline, PersonalizedFluxPipelineOutput
    from .pipeline_personalized_stable_cascade import (
        PersonalizedStableCascadePipeline,
        PersonalizedStableCascadePipelineOutput,
    )
    from .pipeline_personalized_stable_diffusion_xl import (
        PersonalizedStableDiffusionXLPipeline,
        PersonalizedStableDiffusionXLPipelineOutput,
    )
    from .preference_encoder import PreferenceEncoder
    from .preference_pairs import PreferencePair, load_preference_pairs
    from .stage_c_image_encoder import StageCImageEncoder


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        try:
            module = importlib.import_module(f".{_LAZY_NAMES[name]}", __name__)
        except ImportError as err:
            if name != "PaellaVQModel":
                raise
            # an AttributeError keeps `getattr(ppd_diffusers, name, None)` (diffusers' pipeline saving) working
            raise AttributeError(str(err)) from err
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
