"""`CLIPPreferenceEncoder`: the light encoder with the same interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from ppd_diffusers import BasePreferenceEncoder, CLIPPreferenceEncoder, PreferenceEncoder
from ppd_diffusers.preference_pairs import as_user_pairs

from .conftest import random_users


def test_tokens_by_hand(tiny_clip_dir):
    encoder = CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)
    users = random_users(2, seed=7)
    out = encoder.encode(users)
    assert out.shape == (2, 4, 48) == (2, encoder.num_tokens, encoder.embed_dim)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer, processor = (
        AutoTokenizer.from_pretrained(tiny_clip_dir),
        AutoImageProcessor.from_pretrained(tiny_clip_dir),
    )
    with torch.no_grad():
        for u, pairs in enumerate(as_user_pairs(users)):
            for i, pair in enumerate(pairs):
                text = model.get_text_features(**tokenizer([pair.prompt], return_tensors="pt")).pooler_output
                images = processor(images=[pair.chosen, pair.rejected], return_tensors="pt")
                image = F.normalize(model.get_image_features(**images).pooler_output, dim=-1)
                expected = torch.cat([F.normalize(text, dim=-1)[0], image[0] - image[1]])
                torch.testing.assert_close(out[u, i], expected, rtol=1e-5, atol=1e-5)


def test_swapping_chosen_and_rejected_negates_the_image_half(tiny_clip_dir):
    encoder = CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)
    user = random_users(1, seed=8)[0]
    swapped = [(prompt, rejected, chosen) for prompt, chosen, rejected in user]
    a, b = encoder.encode(user), encoder.encode(swapped)
    torch.testing.assert_close(a[..., :24], b[..., :24])
    torch.testing.assert_close(a[..., 24:], -b[..., 24:])


def test_mean_pooling_batched_equals_single_and_save_load(tiny_clip_dir, tmp_path):
    encoder = CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir, pooling="mean", num_pairs=3)
    users = random_users(3, num_pairs=3, seed=9)
    batched = encoder.encode(users, batch_size=2)
    assert batched.shape == (3, 1, 48)
    pairs_encoder = CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir, num_pairs=3)
    torch.testing.assert_close(batched, pairs_encoder.encode(users).mean(dim=1, keepdim=True))
    for u, user in enumerate(users):
        torch.testing.assert_close(batched[u : u + 1], encoder.encode(user), rtol=1e-5, atol=1e-6)
    encoder.save_pretrained(tmp_path)
    loaded = BasePreferenceEncoder.from_pretrained(tmp_path)
    where = {"model_name_or_path"}  # the saved folder holds a copy of the local model
    assert isinstance(loaded, CLIPPreferenceEncoder) and loaded.config["model_name_or_path"].endswith("model")
    assert {k: v for k, v in loaded.config.items() if k not in where} == {
        k: v for k, v in encoder.config.items() if k not in where
    }
    assert loaded.fingerprint() == encoder.fingerprint()  # the same weights, wherever they lie
    assert torch.equal(loaded.encode(users, batch_size=2), batched)
    with pytest.raises(
        ValueError, match="names the encoder class .CLIPPreferenceEncoder., which is not a `PreferenceEncoder`"
    ):
        PreferenceEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`pooling` must be one of"):
        CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir, pooling="last")


def test_weights_missing_from_a_checkpoint_are_reported(tiny_clip_dir, tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken-clip"
    shutil.copytree(tiny_clip_dir, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(k for k in weights if "text_projection" in k)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="ppd_diffusers.encoder_base"):
        CLIPPreferenceEncoder.from_pretrained(broken)
    assert "randomly initialised" in caplog.text and "text_projection" in caplog.text


@pytest.mark.parametrize("drop_module", [False, True])
def test_a_saved_encoder_loads_in_a_fresh_process(tiny_clip_dir, tmp_path, drop_module):
    """The class named in the config is imported on demand (also from configs saved before the module was)."""
    import json
    import subprocess
    import sys

    from ppd_diffusers.encoder_base import CONFIG_NAME

    CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["encoder_module"] == "ppd_diffusers.clip_preference_encoder"
    if drop_module:  # as written by releases before `encoder_module`
        del config["encoder_module"]
        (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    code = (
        "import sys; from ppd_diffusers import BasePreferenceEncoder; "
        "assert 'ppd_diffusers.clip_preference_encoder' not in sys.modules; "
        f"print(type(BasePreferenceEncoder.from_pretrained({str(tmp_path)!r})).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "CLIPPreferenceEncoder"


def test_an_unknown_encoder_class_is_named(tmp_path):
    import json

    from ppd_diffusers.encoder_base import CONFIG_NAME

    config = {"encoder_class": "MyEncoder", "encoder_module": "os", "model_name_or_path": "x"}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names the encoder class 'MyEncoder'.*import the module that defines it"):
        BasePreferenceEncoder.from_pretrained(tmp_path)
