#!/usr/bin/env bash
# Proves the lower bounds of pyproject.toml: installs the lowest diffusers, transformers and huggingface_hub it
# admits (and the tokenizers that transformers release pins) into a separate folder that shadows .venv's
# packages, and runs the tests of every module that touches those libraries against them.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(mktemp -d)"
trap 'rm -rf "$target"' EXIT
mapfile -t pins < <(.venv/bin/python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for name in ("diffusers", "transformers", "huggingface_hub"):
    spec = next(d for d in deps if re.match(rf"{name}\b", d))
    print(f"{name}=={re.search(r'>=([0-9.]+)', spec).group(1)}")
PY
)
.venv/bin/python -m pip install --quiet --no-deps --target "$target" "${pins[@]}"
tokenizers="$(grep -o '"tokenizers>=[0-9.]*' "$target/transformers/dependency_versions_table.py" | cut -d= -f2)"
.venv/bin/python -m pip install --quiet --no-deps --target "$target" "tokenizers==$tokenizers" httpx httpcore h11 anyio
echo "lowest declared versions: ${pins[*]} tokenizers==$tokenizers"
# the Stable Cascade modules, then the SDXL/Flux ones (user processors, pipelines, DPO objectives): diffusers has no
# upper bound for those, so its floor is what this script proves for them
PYTHONPATH="$target" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_stable_cascade_internals.py tests/test_adapter.py tests/test_attention.py tests/test_pipeline.py \
    tests/test_compile.py tests/test_preference_encoder.py tests/test_clip_encoder.py tests/test_embedding_cache.py \
    tests/test_user_processors.py tests/test_pipeline_sdxl.py tests/test_pipeline_flux.py tests/test_dpo_objectives.py
