"""Pins the one private diffusers hook of the pipeline (its loader's class registry) and loads pipelines
by Hub id through an offline Hugging Face cache, as a user's `from_pretrained("org/name")` does."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from diffusers.pipelines import pipeline_loading_utils, pipeline_utils

import ppd_diffusers
from ppd_diffusers._pipeline_loading import register_ppd_diffusers_components

from .conftest import randomize_
from .test_pipeline import TINY, build_pipe, encoder, stable_cascade_repos  # noqa: F401  (fixtures)
from .test_preference_encoder import _fake_hub_cache


def test_registration_reaches_the_dicts_diffusers_loads_and_saves_with():
    register_ppd_diffusers_components()
    register_ppd_diffusers_components()  # idempotent
    # diffusers' pipeline code imported these dicts by name: updating them in place must reach it
    assert pipeline_utils.LOADABLE_CLASSES is pipeline_loading_utils.LOADABLE_CLASSES
    assert pipeline_utils.ALL_IMPORTABLE_CLASSES is pipeline_loading_utils.ALL_IMPORTABLE_CLASSES
    registered = pipeline_loading_utils.LOADABLE_CLASSES["ppd_diffusers"]
    assert set(registered) == {"UserAdapter", "BasePreferenceEncoder", "PaellaVQModel"}
    for name, methods in registered.items():
        cls = getattr(ppd_diffusers, name)
        assert all(callable(getattr(cls, method)) for method in methods)
        assert pipeline_loading_utils.ALL_IMPORTABLE_CLASSES[name] == methods


def test_hub_ids_load_through_the_hub_cache(stable_cascade_repos, encoder, tmp_path):  # noqa: F811
    prior, decoder = stable_cascade_repos
    pipe = build_pipe(stable_cascade_repos, encoder)
    randomize_(pipe.user_adapter)
    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)
    pipe.user_adapter.save_pretrained(tmp_path / "adapter")
    user = torch.randn(1, 4, encoder.embed_dim)
    expected = pipe("a red cat", user_embeds=user, generator=torch.Generator().manual_seed(0), output_type="pt",
                    height=32, width=32, num_inference_steps=3, decoder_num_inference_steps=2).images  # fmt: skip
    torch.save({"user": user, "expected": expected}, tmp_path / "expected.pt")
    cache = tmp_path / "hub"
    for repo, folder in (
        ("stabilityai/stable-cascade-prior", prior),
        ("stabilityai/stable-cascade", decoder),
        ("ppd-test/tiny-ppd-pipeline", saved),
        ("ppd-test/tiny-ppd-adapter", tmp_path / "adapter"),
    ):
        _fake_hub_cache(cache, repo, str(folder), ["c" * 40])
    code = f"""
import torch
from ppd_diffusers import PersonalizedStableCascadePipeline
data = torch.load({str(tmp_path / "expected.pt")!r})
call = dict(user_embeds=data["user"], output_type="pt", height=32, width=32, num_inference_steps=3,
            decoder_num_inference_steps=2)
saved = PersonalizedStableCascadePipeline.from_pretrained("ppd-test/tiny-ppd-pipeline")
built = PersonalizedStableCascadePipeline.from_stable_cascade(
    "ppd-test/tiny-ppd-adapter", load_image_encoder=True, resolution_multiple={TINY["resolution_multiple"]},
    latent_dim_scale={TINY["latent_dim_scale"]})
built.load_user_adapter("ppd-test/tiny-ppd-adapter", weight_name="diffusion_pytorch_model.safetensors")
for pipe in (saved, built):
    images = pipe("a red cat", generator=torch.Generator().manual_seed(0), **call).images
    assert torch.equal(images, data["expected"]), (images - data["expected"]).abs().max()
print("ok")
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
