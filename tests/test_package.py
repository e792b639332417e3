"""Packaging: light import, version, public names."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import ppd_diffusers


def _new_modules(setup: str, code: str) -> set[str]:
    script = (
        f"import json, sys\n{setup}\nbefore = set(sys.modules)\n{code}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_alone_loads_nothing_heavy():
    new = _new_modules("", "import ppd_diffusers")
    assert not {"torch", "diffusers", "transformers", "datasets"} & new
    assert all(name.split(".")[0] in sys.stdlib_module_names or name.startswith("ppd_diffusers") for name in new), new


PIPELINE_NAMES = ["PaellaVQModel", "PersonalizedStableCascadePipeline", "PersonalizedStableCascadePipelineOutput"]
OTHER_PIPELINE_NAMES = [
    "PersonalizedFluxPipeline",
    "PersonalizedFluxPipelineOutput",
    "PersonalizedStableDiffusionXLPipeline",
    "PersonalizedStableDiffusionXLPipelineOutput",
]


def _foreign_modules(setup: str, names: list[str]) -> set[str]:
    code = f"import ppd_diffusers\nfor name in {names!r}: getattr(ppd_diffusers, name)"
    new = _new_modules(setup, code)
    assert "ppd_diffusers.training" not in new and "datasets" not in new
    return {n for n in new if not n.startswith("ppd_diffusers") and n.split(".")[0] not in sys.stdlib_module_names}


def test_core_names_load_nothing_beyond_what_diffusers_itself_imports():
    setup = "from diffusers import ConfigMixin, DDPMWuerstchenScheduler, ModelMixin, StableCascadeUNet"
    pipelines = PIPELINE_NAMES + OTHER_PIPELINE_NAMES
    names = [name for name in ppd_diffusers.__all__ if name not in pipelines and name != "__version__"]
    foreign = _foreign_modules(setup, names)
    assert not foreign, f"`import ppd_diffusers` pulled in {sorted(foreign)}"


def test_pipeline_loads_nothing_beyond_diffusers_pipelines():
    setup = (
        "from diffusers import DiffusionPipeline, DDPMWuerstchenScheduler, StableCascadeUNet\n"
        "from diffusers.callbacks import PipelineCallback\n"
        "from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel"
    )
    foreign = _foreign_modules(setup, PIPELINE_NAMES)
    assert not foreign, f"the pipeline pulled in {sorted(foreign)}"


def test_sdxl_and_flux_pipelines_load_nothing_beyond_their_diffusers_parents():
    setup = "from diffusers import FluxPipeline, StableDiffusionXLPipeline"
    foreign = _foreign_modules(setup, OTHER_PIPELINE_NAMES)
    assert not foreign, f"the SDXL/Flux pipelines pulled in {sorted(foreign)}"


def test_version_comes_from_package_metadata():
    assert ppd_diffusers.__version__ == version("ppd-diffusers")


def test_every_public_name_resolves_and_is_documented():
    import ppd_diffusers.evaluation
    import ppd_diffusers.training

    docs = "".join(path.read_text() for path in (Path(__file__).parents[1] / "docs" / "api").glob("*.md"))
    for module in (ppd_diffusers, ppd_diffusers.training, ppd_diffusers.evaluation):
        for name in module.__all__:
            if name == "__version__":
                continue
            obj = getattr(module, name)
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
            assert f"::: {module.__name__}.{name}" in docs, f"{module.__name__}.{name} has no docs page"
    assert set(ppd_diffusers.__all__) <= set(dir(ppd_diffusers))
    assert set(ppd_diffusers.evaluation.__all__) <= set(dir(ppd_diffusers.evaluation))
