"""`PreferencePair` inputs: every accepted form, and clear errors naming the offending pair."""

from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ppd_diffusers import PreferencePair, load_preference_pairs
from ppd_diffusers.preference_pairs import as_user_pairs, load_rgb_image


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


RED = PIL.Image.new("RGB", (6, 4), (255, 0, 0))


def test_every_image_form_becomes_the_same_rgb_image(tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    array = np.asarray(RED)
    forms = {
        "pil": RED,
        "rgba": RED.convert("RGBA"),
        "palette": RED.convert("P"),
        "hwc_uint8": array,
        "chw_float": array.transpose(2, 0, 1) / 255.0,
        "tensor_chw_float": torch.from_numpy(array.transpose(2, 0, 1) / 255.0),
        "tensor_chw_uint8": torch.from_numpy(array.transpose(2, 0, 1).copy()),
        "tensor_batch_of_one": torch.from_numpy(array.transpose(2, 0, 1) / 255.0)[None],
        "bytes": _png_bytes(RED),
        "path_str": str(path),
        "path": path,
        "datasets_dict": {"bytes": _png_bytes(RED), "path": None},
    }
    for name, image in forms.items():
        converted = load_rgb_image(image, name)
        assert converted.mode == "RGB" and converted.size == (6, 4), name
        assert np.array_equal(np.asarray(converted), array), name
    gray = load_rgb_image(np.full((4, 6), 7, dtype=np.uint8))
    assert np.asarray(gray).tolist() == [[[7, 7, 7]] * 6] * 4


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_uint8_arrays_round_trip(array):
    assert np.array_equal(np.asarray(load_rgb_image(array)), array)


def test_pairs_tuples_and_dicts_are_one_user_or_many():
    pair = PreferencePair("a", RED, RED)
    as_tuple, as_dict = ("b", RED, RED), {"prompt": "c", "chosen": RED, "rejected": RED}
    one = as_user_pairs([pair, as_tuple, as_dict])
    assert len(one) == 1 and [p.prompt for p in one[0]] == ["a", "b", "c"]
    many = as_user_pairs([[pair, as_tuple], [as_dict, as_dict]], num_pairs=2)
    assert len(many) == 2 and [p.prompt for p in many[1]] == ["c", "c"]
    assert all(isinstance(p.chosen, PIL.Image.Image) for user in many for p in user)


def test_errors_name_the_argument_and_the_pair():
    good = ("a", RED, RED)
    cases = [
        ([good] * 3, r"`preference_pairs` needs 4 pairs, got 3"),
        ([[good] * 4, [good] * 2], r"`preference_pairs\[1\]` needs 4 pairs, got 2"),
        ([good, good, ("  ", RED, RED), good], r"`preference_pairs\[2\].prompt` must be a non-empty string"),
        ([good, (3, RED, RED), good, good], r"`preference_pairs\[1\].prompt` must be a non-empty string"),
        ([good, good, good, ("a", RED, 42)], r"`preference_pairs\[3\].rejected` must be a PIL image.*got int"),
        ([good, ("a", b"not an image", RED), good, good], r"`preference_pairs\[1\].chosen` is not a readable image"),
        ([good, good, good, ("a", "/no/such/file.png", RED)], r"`preference_pairs\[3\].chosen` is not a readable"),
        ([good, good, good, {"prompt": "a", "chosen": RED}], r"`preference_pairs\[3\]` is a dict without .*rejected"),
        ([good, good, good, ("a", RED)], r"`preference_pairs\[3\]` must be a `PreferencePair`"),
        ([], r"`preference_pairs` must be a non-empty list"),
    ]
    for pairs, message in cases:
        with pytest.raises(ValueError, match=message):
            as_user_pairs(pairs, num_pairs=4)


def test_half_precision_tensors_are_images():
    image = torch.rand(3, 5, 4)
    expected = np.asarray(load_rgb_image(image))
    bf16 = np.asarray(load_rgb_image(image.bfloat16()))
    assert bf16.shape == (5, 4, 3) and np.abs(bf16.astype(int) - expected).max() <= 2


def test_bad_arrays_raise():
    with pytest.raises(ValueError, match=r"`x` holds floats in \[-1, 1\].*\(image \+ 1\) / 2"):
        load_rgb_image(torch.linspace(-1, 1, 48).view(3, 4, 4), "x")
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_rgb_image(np.full((2, 2, 3), np.nan), "x")
    with pytest.raises(ValueError, match=r"image array, got shape \(2, 2, 5\)"):
        load_rgb_image(np.zeros((2, 2, 5), np.uint8), "x")
    with pytest.raises(ValueError, match="uint8 values or floats"):
        load_rgb_image(np.zeros((2, 2, 3), np.int64), "x")


def test_a_truncated_image_file_is_reported(tmp_path):
    data = _png_bytes(PIL.Image.new("RGB", (64, 64), "blue"))
    path = tmp_path / "broken.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"`pairs\[1\]\[0\].rejected` is not a readable image \(file.*truncated"):
        as_user_pairs([[("a", RED, RED)], [("b", RED, str(path))]], name="pairs")


def test_load_preference_pairs_from_file_and_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        PIL.Image.new("L", (6, 4), 128 if color == "red" else 20).save(tmp_path / "imgs" / name)
    items = [{"prompt": "p0", "chosen": "imgs/a.png", "rejected": "imgs/b.png"},
             {"prompt": "p1", "chosen": str(tmp_path / "imgs" / "b.png"), "rejected": "imgs/a.png"}]  # fmt: skip
    (tmp_path / "pairs.json").write_text(json.dumps(items))
    for source in (tmp_path, tmp_path / "pairs.json"):
        pairs = load_preference_pairs(source)
        assert [p.prompt for p in pairs] == ["p0", "p1"]
        assert pairs[0].chosen.mode == "RGB" and pairs[0].chosen.size == (6, 4)
        assert np.asarray(pairs[1].chosen).max() == 20 and np.asarray(pairs[1].rejected).max() == 128


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not valid JSON"),
        ('{"prompt": "p"}', "must hold a list"),
        ('["x"]', r"pairs.json\[0\]` must be an object"),
        ('[{"prompt": "p", "chosen": 3, "rejected": "b.png"}]', r"pairs.json\[0\].chosen` must be an image path"),
        ('[{"prompt": "p", "chosen": "missing.png", "rejected": "missing.png"}]', r"pairs.json\[0\].chosen"),
        ('[{"prompt": "", "chosen": "a.png", "rejected": "a.png"}]', r"pairs.json\[0\].prompt"),
    ],
)
def test_load_preference_pairs_errors_name_the_pair(tmp_path, content, message):
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "pairs.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_preference_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="pairs.json"):
        load_preference_pairs(tmp_path / "nowhere")


def test_sixteen_bit_and_float_images_keep_their_brightness(tmp_path):
    grey = np.full((4, 4), 20000, dtype=np.uint16)  # 20000 / 65535 of full scale: 78 of 255
    sixteen = PIL.Image.fromarray(grey)
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "grey.png")
    for image in (sixteen, str(tmp_path / "grey.png")):
        assert np.asarray(load_rgb_image(image)).tolist() == np.full((4, 4, 3), 78).tolist()
    half = PIL.Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert half.mode == "F" and np.asarray(load_rgb_image(half)).max() == 128
    with pytest.raises(ValueError, match=r"`img` holds floats in \[2, 2\]"):
        load_rgb_image(PIL.Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32)), "img")
    with pytest.raises(ValueError, match="`img` is a 32-bit integer \\('I' mode\\) image"):
        load_rgb_image(sixteen.convert("I"), "img")


def test_huge_images_are_shrunk_while_decoded_and_small_ones_untouched():
    rng = np.random.default_rng(0)
    big = PIL.Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    for image in (buffer.getvalue(), big, np.asarray(big)):
        shrunk = load_rgb_image(image, max_side=500)
        assert shrunk.size == (500, 375)
    assert big.size == (4000, 3000)  # the caller's image is not changed
    small = PIL.Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    assert load_rgb_image(small, max_side=500) is small
    (user,) = as_user_pairs([("a", big, small)], max_side=100)
    assert user[0].chosen.size == (100, 75) and user[0].rejected.size == (30, 40)


def test_encoders_shrink_at_four_times_their_vision_size(tiny_clip_dir, tiny_llava_dir):
    from ppd_diffusers import CLIPPreferenceEncoder, PreferenceEncoder

    for encoder in (
        CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir),
        PreferenceEncoder.from_pretrained(tiny_llava_dir),
    ):
        assert encoder.max_image_side == 4 * encoder.model.config.vision_config.image_size
