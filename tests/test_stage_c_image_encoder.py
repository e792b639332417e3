"""`StageCImageEncoder` (Stability's effnet), its preprocessing, and `add_stage_c_latents` on a tiny Pick-a-Pic set."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from ppd_diffusers.stage_c_image_encoder import (
    EFFNET_MEAN,
    EFFNET_STD,
    StageCImageEncoder,
    effnet_input_size,
    preprocess_images,
    stage_c_latent_size,
)

from .toy_pickapic import write_parquet

ROOT = Path(__file__).resolve().parents[1]
# a 128 px Stage C image is a 3x3 latent grid encoded from 96 px: real forwards that stay cheap on a CPU
SMALL = 128


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _random_batchnorm_stats(module: torch.nn.Module, seed: int) -> None:
    # fresh BatchNorms are identities (mean 0, var 1): random statistics make a missed buffer visible
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)


@pytest.fixture(scope="module")
def encoder() -> StageCImageEncoder:
    torch.manual_seed(0)
    model = StageCImageEncoder()
    _random_batchnorm_stats(model, seed=0)
    return model


@pytest.fixture(scope="module")
def stability_file(encoder, tmp_path_factory) -> Path:
    # Stability's file: a flat safetensors state dict of `EfficientNetEncoder` (modules/effnet.py)
    path = tmp_path_factory.mktemp("stability") / "effnet_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    return path


def _pixels(seed: int = 0, size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_state_dict_keys_are_stability_layout(encoder):
    from torchvision.models import efficientnet_v2_s

    features = efficientnet_v2_s(weights=None).features.state_dict()
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in features.items()}
    expected.update(
        {
            "mapper.0.weight": (16, 1280, 1, 1),  # Conv2d(1280, 16, 1, bias=False)
            "mapper.1.running_mean": (16,),  # BatchNorm2d(16, affine=False): statistics, no weight/bias
            "mapper.1.running_var": (16,),
            "mapper.1.num_batches_tracked": (),
        }
    )
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == expected


@pytest.mark.parametrize("drop_counters", [False, True])
def test_stability_file_loads_from_a_file_and_a_folder(encoder, stability_file, tmp_path, drop_counters):
    source = stability_file
    if drop_counters:  # the BatchNorm counters are optional: they do not change an eval-mode encoder
        state = {k: v for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked")}
        source = tmp_path / "models" / "effnet_encoder.safetensors"
        source.parent.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    pixels = _pixels()
    expected = encoder(pixels)
    from_file = StageCImageEncoder.from_stability_checkpoint(source)
    assert not from_file.training and from_file.config.latent_channels == 16
    torch.testing.assert_close(from_file(pixels), expected, rtol=0, atol=0)
    if drop_counters:  # a folder with a subfolder, as in the Stability checkout's models/
        from_folder = StageCImageEncoder.from_stability_checkpoint(tmp_path, subfolder="models")
    else:
        from_folder = StageCImageEncoder.from_stability_checkpoint(stability_file.parent)
    torch.testing.assert_close(from_folder(pixels), expected, rtol=0, atol=0)


def test_stability_file_sets_latent_channels_and_dtype(tmp_path):
    torch.manual_seed(1)
    narrow = StageCImageEncoder(latent_channels=8)
    path = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in narrow.state_dict().items()}, str(path))
    loaded = StageCImageEncoder.from_stability_checkpoint(path, torch_dtype=torch.bfloat16)
    assert loaded.config.latent_channels == 8 and loaded.dtype == torch.bfloat16
    assert loaded(_pixels(size=64).bfloat16()).shape == (2, 8, 2, 2)


def test_bad_checkpoints_are_named(encoder, tmp_path):
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    broken = {k: v for k, v in state.items() if not k.startswith("backbone.7.")}
    broken["head.weight"] = torch.zeros(3)
    broken["backbone.0.0.weight"] = torch.zeros(24, 3, 5, 5)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(ValueError) as info:
        StageCImageEncoder.from_stability_checkpoint(path)
    message = str(info.value)
    assert "missing keys: `backbone.7.0.weight`" in message and "`backbone.7.1.running_mean`" in message
    assert "1 unexpected keys: `head.weight`" in message
    assert "`backbone.0.0.weight` (24, 3, 5, 5) (expected (24, 3, 3, 3))" in message

    # a pickle (or anything else) is refused without being unpickled
    pickled = tmp_path / "effnet.pt"
    torch.save(state, pickled)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        StageCImageEncoder.from_stability_checkpoint(pickled)
    with pytest.raises(FileNotFoundError, match="effnet_encoder.safetensors"):
        StageCImageEncoder.from_stability_checkpoint(tmp_path)
    for missing in (tmp_path / "nowhere" / "effnet.safetensors", "models/effnet_encoder.safetensors"):
        with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a Hub repo id"):
            StageCImageEncoder.from_stability_checkpoint(missing)


def test_save_pretrained_round_trip(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["latent_channels"] == 16 and config["ppd_diffusers_version"]
    loaded = StageCImageEncoder.from_pretrained(tmp_path)
    assert not loaded.training
    pixels = _pixels(seed=3)
    torch.testing.assert_close(loaded(pixels), encoder(pixels), rtol=0, atol=0)


def test_encoder_is_frozen_and_uses_running_statistics(encoder):
    pixels = _pixels(seed=4, batch=3)
    encoder.train()  # e.g. a parent module switched to training mode: the encoder must not follow
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    batched = encoder(pixels)
    # with batch statistics the latents of an image would depend on its batch-mates
    alone = torch.cat([encoder(pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    # running statistics, by hand: standardise the 1x1 projection of the backbone's features
    projected = torch.nn.functional.conv2d(encoder.backbone(pixels), encoder.mapper[0].weight)
    stats = encoder.mapper[1]
    by_hand = (projected - stats.running_mean[:, None, None]) / torch.sqrt(stats.running_var[:, None, None] + 1e-5)
    torch.testing.assert_close(batched, by_hand, rtol=1e-4, atol=1e-4)


def test_sizes():
    # Stage C's grid is ceil(size / 42.67) as in the Stable Cascade pipelines; the encoder input is 32x that
    assert stage_c_latent_size(1024, 1024) == (24, 24)
    assert effnet_input_size(1024, 1024) == (768, 768)
    assert effnet_input_size(512, 1536) == (384, 1152)
    assert stage_c_latent_size(768, 1000) == (18, 24)
    # for multiples of 128 it is Stability's 3/4 rule (inference/utils.py::downscale_images)
    for size in range(128, 4097, 128):
        assert effnet_input_size(size, size)[0] == int(size * 3 / 4 // 32 * 32)
    with pytest.raises(ValueError, match="`height` must be a positive integer"):
        stage_c_latent_size(0, 1024)


def test_a_1024_image_encodes_to_24x24(encoder):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    latents = encoder.encode(image, height=1024, width=1024)
    assert latents.shape == (1, 16, 24, 24) and latents.dtype == torch.float32
    assert torch.isfinite(latents).all()


def test_preprocess_normalizes_resizes_and_center_crops():
    color = (200, 100, 50)
    (pixels,) = preprocess_images(PIL.Image.new("RGB", (300, 200), color), height=SMALL, width=SMALL)
    assert pixels.shape == (3, 96, 96)
    expected = (np.asarray(color) / 255 - np.asarray(EFFNET_MEAN)) / np.asarray(EFFNET_STD)
    for channel in range(3):
        torch.testing.assert_close(pixels[channel], torch.full((96, 96), float(expected[channel])), rtol=0, atol=1e-6)

    # a wide image keeps its middle: red | green | blue thirds -> green, only the crop edges may blend
    stripes = np.zeros((100, 300, 3), dtype=np.uint8)
    stripes[:, :100, 0] = stripes[:, 100:200, 1] = stripes[:, 200:, 2] = 255
    (pixels,) = preprocess_images(stripes, height=SMALL, width=SMALL)
    green = (np.asarray([0, 1, 0]) - np.asarray(EFFNET_MEAN)) / np.asarray(EFFNET_STD)
    torch.testing.assert_close(
        pixels[:, :, 2:-2],
        torch.tensor(green, dtype=torch.float32)[:, None, None].expand(3, 96, 92),
        rtol=0,
        atol=1e-6,
    )

    # every accepted input type gives the same pixels
    array = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    reference = preprocess_images(PIL.Image.fromarray(array), height=SMALL, width=SMALL)
    as_tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    for same in (array, _png(array), {"bytes": _png(array), "path": None}, as_tensor, as_tensor[None]):
        torch.testing.assert_close(preprocess_images(same, height=SMALL, width=SMALL), reference, rtol=0, atol=1e-6)


def test_encode_names_the_unreadable_image_and_batches_like_one_call(encoder):
    rng = np.random.default_rng(2)
    images = [_png(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    together = encoder.encode(images, height=SMALL, width=SMALL, batch_size=3)
    in_chunks = encoder.encode(images, height=SMALL, width=SMALL, batch_size=2)
    assert together.shape == (3, 16, 3, 3)
    torch.testing.assert_close(in_chunks, together, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"`images\[2\]` is not a readable image"):
        encoder.encode([*images[:2], b"not an image"], height=SMALL, width=SMALL, batch_size=2)
    with pytest.raises(ValueError, match="`pixel_values` must be a batch of RGB images"):
        encoder(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="`images` is empty"):
        encoder.encode([])


def test_import_needs_no_torchvision_and_building_explains_how_to_get_it():
    code = (
        "import sys\n"
        "sys.modules['torchvision'] = None  # as if it were not installed\n"
        "import ppd_diffusers\n"
        "from ppd_diffusers.stage_c_image_encoder import StageCImageEncoder, preprocess_images\n"
        "from ppd_diffusers.training.latents import add_stage_c_latents\n"
        "import PIL.Image\n"
        "assert preprocess_images(PIL.Image.new('RGB', (8, 8)), 128, 128).shape == (1, 3, 96, 96)\n"
        "try:\n"
        "    StageCImageEncoder()\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'ppd-diffusers[train]'" in result.stdout


# ---------------------------------------------------------------- add_stage_c_latents on a tiny Pick-a-Pic set

CORRUPT_ROW = 2


def pickapic_rows(seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "user_id": []}
    for i, label in enumerate([1.0, 0.0, 1.0, 0.5, 0.0]):  # row 3 is a tie: kept
        rows["caption"].append(f"prompt {i}")
        rows["jpg_0"].append(_png(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)))
        rows["jpg_1"].append(_png(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)))
        rows["label_0"].append(label)
        rows["label_1"].append(1 - label)
        rows["user_id"].append(i % 2)
    rows["jpg_1"][CORRUPT_ROW] = b"\xff\xd8 garbage, not a JPEG"
    return rows


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> str:
    return write_parquet(tmp_path_factory.mktemp("pickapic") / "train.parquet", pickapic_rows())


def test_add_stage_c_latents_marks_corrupt_rows_and_matches_encode(encoder, dataset_file, tmp_path, caplog):
    import datasets

    from ppd_diffusers.training.latents import add_stage_c_latents

    source = datasets.load_dataset("parquet", data_files=dataset_file, split="train")
    with caplog.at_level(logging.WARNING, logger="ppd_diffusers.training.latents"):
        result = add_stage_c_latents(source, encoder, height=SMALL, width=SMALL, batch_size=2)
    assert "1 of 5 rows have an unreadable image" in caplog.text
    assert result.column_names == [*source.column_names, "latents_0", "latents_1", "latents_ok"]
    assert result.features["latents_0"] == datasets.Array3D(shape=(16, 3, 3), dtype="float16")
    assert result["caption"] == source["caption"] and result["label_0"] == source["label_0"]
    assert list(result["latents_ok"]) == [row != CORRUPT_ROW for row in range(5)]

    table = result.with_format("numpy")[:]
    good = [row for row in range(5) if row != CORRUPT_ROW]
    for side in (0, 1):
        latents = table[f"latents_{side}"]
        assert latents.shape == (5, 16, 3, 3)
        assert not latents[CORRUPT_ROW].any()
        images = [PIL.Image.open(io.BytesIO(source[row][f"jpg_{side}"])) for row in good]
        expected = encoder.encode(images, height=SMALL, width=SMALL).numpy()
        np.testing.assert_allclose(latents[good], expected, rtol=2e-3, atol=2e-3)  # float16 storage

    # fingerprinted by `datasets`: the same call again loads the cache instead of encoding
    again = add_stage_c_latents(source, encoder, height=SMALL, width=SMALL, batch_size=2)
    assert again.cache_files == result.cache_files
    other_size = add_stage_c_latents(source, encoder, height=64, width=64, batch_size=2)
    assert other_size.cache_files != result.cache_files

    result.save_to_disk(tmp_path / "saved")
    reloaded = datasets.load_from_disk(tmp_path / "saved")
    assert reloaded.features == result.features
    np.testing.assert_array_equal(reloaded.with_format("numpy")[:]["latents_1"], table["latents_1"])


def test_add_stage_c_latents_with_decoded_image_columns_and_bad_arguments(encoder):
    import datasets

    from ppd_diffusers.training.latents import add_stage_c_latents

    rows = pickapic_rows(seed=1)
    small = datasets.Dataset.from_dict({k: v[:3] for k, v in rows.items()})
    as_images = small.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    result = add_stage_c_latents(as_images, encoder, height=64, width=64, dtype="float32")
    assert result.features["jpg_1"] == datasets.Image()  # decoding is restored
    assert result.features["latents_1"] == datasets.Array3D(shape=(16, 2, 2), dtype="float32")
    assert list(result["latents_ok"]) == [True, True, False]

    with pytest.raises(ValueError, match="`dataset` has no column 'jpg_0'"):
        add_stage_c_latents(small.remove_columns("jpg_0"), encoder)
    with pytest.raises(ValueError, match="already has 'latents_ok'"):
        add_stage_c_latents(result.remove_columns(["latents_0", "latents_1"]), encoder)
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        add_stage_c_latents(small, encoder, dtype="bfloat16")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        add_stage_c_latents(small, encoder, batch_size=0)


def test_example_precomputes_and_saves_with_and_without_streaming(stability_file, dataset_file, tmp_path):
    import datasets

    saved = {}
    for streaming in (False, True):
        out = tmp_path / f"latents-{streaming}"
        command = [sys.executable, str(ROOT / "examples" / "precompute_latents.py"), "--dataset", dataset_file]
        command += ["--effnet_checkpoint", str(stability_file), "--resolution", str(SMALL), "--batch_size", "2"]
        command += ["--output_dir", str(out), *(["--streaming"] if streaming else [])]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "5 rows encoded, 1 with an unreadable image (latents_ok=False); latents 16x3x3" in result.stderr
        saved[streaming] = datasets.load_from_disk(out)
        assert list(saved[streaming]["latents_ok"]) == [row != CORRUPT_ROW for row in range(5)]
        assert "jpg_0" not in saved[streaming].column_names  # training from latents needs no images
        info = json.loads((out / "latents_info.json").read_text())
        assert info["rows_with_unreadable_images"] == 1 and info["latent_shape"] == [16, 3, 3]
    # the stream is written in the source's row order: same rows, same latents
    plain, streamed = (saved[k].with_format("numpy")[:] for k in (False, True))
    assert plain["caption"].tolist() == streamed["caption"].tolist()
    np.testing.assert_array_equal(plain["latents_0"], streamed["latents_0"])
