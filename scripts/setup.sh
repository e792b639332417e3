#!/usr/bin/env bash
# Creates .venv with torch, torchvision and ppd-diffusers (editable) with its test, docs, train, testbed, eval and
# stable-cascade extras (the last caps diffusers where the Stable Cascade internals were tested: the tests run them).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned to a pair whose torchvision imports (the Stage C image encoder of the `train` extra is
# torchvision's EfficientNetV2-S): an unpinned torch would download a multi-GB build, and PyPI's torchvision
# does not import beside the torch 2.13.0 CPU build.
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[test,docs,train,testbed,eval,stable-cascade]"
