"""``PaellaVQModel`` (Stable Cascade's Stage A) under an import path that pipelines can save and load.

diffusers keeps ``PaellaVQModel`` only inside its deprecated Würstchen pipeline package, which its
pipeline loader cannot resolve: a saved pipeline records the VQGAN as ``["diffusers", "PaellaVQModel"]``
and ``from_pretrained`` then fails (diffusers issue #14008). This subclass adds nothing but a module in
``ppd_diffusers``, so ``PersonalizedStableCascadePipeline`` records it as ``["ppd_diffusers",
"PaellaVQModel"]`` and loads it back. Only decoding images needs it: prior-only use never imports it.
"""

from __future__ import annotations

try:
    from diffusers import PaellaVQModel as _DiffusersPaellaVQModel
except ImportError:  # diffusers 0.36-0.42 keep it in the deprecated Würstchen package, earlier ones in wuerstchen
    try:
        from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import (
            PaellaVQModel as _DiffusersPaellaVQModel,
        )
    except ImportError:
        try:
            from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import (
                PaellaVQModel as _DiffusersPaellaVQModel,
            )
        except ImportError as err:
            raise ImportError(
                "This diffusers release no longer ships `PaellaVQModel` (Stable Cascade's Stage A), which decoding "
                "images needs. Install `diffusers<0.43`, or generate Stage C latents only with "
                "`output_type='latent'`."
            ) from err

__all__ = ["PaellaVQModel"]


class PaellaVQModel(_DiffusersPaellaVQModel):
    r"""diffusers' ``PaellaVQModel``, importable from ``ppd_diffusers`` so that saved pipelines load back.

    Same weights, config and methods as the diffusers class; ``from_pretrained`` reads the ``vqgan`` folder of
    ``stabilityai/stable-cascade`` as is.

    Examples:
        >>> import torch
        >>> vqgan = PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=32)
        >>> tuple(vqgan.decode(torch.zeros(1, 4, 8, 8)).sample.shape)  # Stage A upsamples 4x
        (1, 3, 32, 32)
    """
