"""Teaches diffusers' pipeline loader about ppd-diffusers components (the one private hook it needs).

``DiffusionPipeline.save_pretrained``/``from_pretrained`` handle only classes listed in
``diffusers.pipelines.pipeline_loading_utils.LOADABLE_CLASSES`` (by library, then base class name). Other
classes are skipped when saving (``PreferenceEncoder``), recorded under their module path and refused
when loading from the Hub as remote code (``UserAdapter``), or recorded under a name the loader cannot
resolve (diffusers' own ``PaellaVQModel``, issue #14008). Registering the library ``ppd_diffusers`` with
these names makes a saved ``model_index.json`` list ``["ppd_diffusers", "UserAdapter"]`` etc., which
loads locally and from the Hub with every loading option. ``tests/test_pipeline_loading.py`` pins it.
"""

from __future__ import annotations

from diffusers.pipelines import pipeline_loading_utils

__all__ = ["register_ppd_diffusers_components"]

# public name in `ppd_diffusers` -> [save method, load method]
_COMPONENTS = {
    "UserAdapter": ["save_pretrained", "from_pretrained"],
    "BasePreferenceEncoder": ["save_pretrained", "from_pretrained"],
    "PaellaVQModel": ["save_pretrained", "from_pretrained"],
}


def register_ppd_diffusers_components() -> None:
    """Adds ``ppd_diffusers`` and its components to diffusers' loadable classes (idempotent)."""
    # both dicts are module-level objects that diffusers' pipeline code imported by reference
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault("ppd_diffusers", {}).update(_COMPONENTS)
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(_COMPONENTS)
