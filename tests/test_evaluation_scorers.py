"""Reward scorers (`ppd_diffusers.evaluation`): each published formula recomputed by hand on tiny real models
saved in the published layouts, batching and dtype invariance, input handling and clear errors."""

from __future__ import annotations

import argparse
import io
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from ppd_diffusers import evaluation
from ppd_diffusers.evaluation import (
    SCORERS,
    AestheticScorer,
    CLIPScorer,
    HPSv2Scorer,
    PickScoreScorer,
    RewardScorer,
    load_scorer,
)
from ppd_diffusers.evaluation.hps import HPS_CHECKPOINTS, OPENAI_MEAN, OPENAI_STD, hps_pixel_values
from ppd_diffusers.testing_utils import (
    TINY_OPEN_CLIP_NAME,
    save_tiny_aesthetic_predictor,
    save_tiny_hps,
    tiny_clip,
)

open_clip = pytest.importorskip("open_clip", reason="the `eval` extra (open-clip-torch) is not installed")

PROMPTS = ["a red cat", "a blue dog on grass", "preferred image", "cat", "a photo of a red cat on blue grass"]
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP with the aesthetic head beside it (the layout of both Hub repos in one folder)."""
    path = str(tmp_path_factory.mktemp("aesthetic"))
    save_tiny_aesthetic_predictor(path)
    return path


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hps"))
    save_tiny_hps(path)
    return path


@pytest.fixture(scope="module")
def scorers(clip_dir, hps_dir):
    """Every scorer loaded from its tiny folder through `load_scorer` (the path a Hub id takes)."""
    return {
        "clip_score": load_scorer("clip_score", clip_dir),
        "pickscore": load_scorer("pickscore", clip_dir, processor_name_or_path=clip_dir),
        "aesthetic": load_scorer("aesthetic", clip_dir, clip_name_or_path=clip_dir),
        "hps": load_scorer("hps", hps_dir, model_name=TINY_OPEN_CLIP_NAME),
    }


def clip_cosines(path: str, images, prompts) -> torch.Tensor:
    """cos(image embedding, text embedding) of the CLIP at ``path``, one prompt at a time."""
    model = CLIPModel.from_pretrained(path).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    cosines = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            image_embed = model.get_image_features(**processor(images=[image], return_tensors="pt")).pooler_output
            text_embed = model.get_text_features(**tokenizer([prompt], return_tensors="pt")).pooler_output
            cosines.append(F.cosine_similarity(image_embed, text_embed)[0])
    return torch.stack(cosines)


# ---------------------------------------------------------------------------------------------- the registry
def test_registry_and_package_exports():
    assert {
        "clip_score": CLIPScorer,
        "pickscore": PickScoreScorer,
        "aesthetic": AestheticScorer,
        "hps": HPSv2Scorer,
    } == SCORERS
    assert all(cls.name == name and issubclass(cls, RewardScorer) for name, cls in SCORERS.items())
    assert {"RewardScorer", "SCORERS", "load_scorer", "CLIPScorer", "HPSv2Scorer"} <= set(evaluation.__all__)
    defaults = {name: cls.default_name_or_path for name, cls in SCORERS.items()}
    assert defaults == {
        "clip_score": "openai/clip-vit-large-patch14",
        "pickscore": "yuvalkirstain/PickScore_v1",
        "aesthetic": "camenduru/improved-aesthetic-predictor",
        "hps": "xswu/HPSv2",
    }
    with pytest.raises(ValueError, match="`name` must be one of"):
        load_scorer("imagereward")


# ---------------------------------------------------------------------------------------------- formulas by hand
def test_clip_score_is_100_times_the_clamped_cosine(scorers, clip_dir):
    images = random_images(5)
    scores = scorers["clip_score"](images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (5,)
    expected = 100 * torch.clamp(clip_cosines(clip_dir, images, PROMPTS), min=0)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scorers["clip_score"]._from_cosine(torch.tensor([-0.5, 0.25])), torch.tensor([0, 25.0]))


def test_torchvision_image_processor_preprocesses_on_the_model_device(tmp_path, clip_dir):
    # the real Hub repos load transformers' torchvision backend, which `image_pixel_values` runs on the device
    from transformers import CLIPImageProcessor

    shutil.copytree(clip_dir, tmp_path, dirs_exist_ok=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    scorer = CLIPScorer.from_pretrained(tmp_path)
    assert scorer.image_processor.backend == "torchvision"
    images = random_images(3, seed=9, size=(50, 70))
    expected = 100 * torch.clamp(clip_cosines(str(tmp_path), images, PROMPTS[:3]), min=0)
    torch.testing.assert_close(scorer(images, PROMPTS[:3]), expected, rtol=1e-5, atol=1e-4)


def test_pickscore_is_the_learned_temperature_times_the_cosine(tmp_path, clip_dir):
    # the model folder holds no tokenizer or image processor: they must come from `processor_name_or_path`
    model, _, _ = tiny_clip(seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.save_pretrained(tmp_path)
    assert not any("token" in name or "preprocessor" in name for name in os.listdir(tmp_path))
    scorer = PickScoreScorer.from_pretrained(tmp_path, processor_name_or_path=clip_dir)
    images = random_images(4, seed=1)
    model = CLIPModel.from_pretrained(tmp_path).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(clip_dir), AutoImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():  # the model card's code: a batch of images against each prompt
        image_embs = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text = tokenizer(PROMPTS[:4], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_embs = model.get_text_features(**text).pooler_output
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        expected = torch.exp(torch.tensor(3.0)) * (text_embs @ image_embs.T).diagonal()
    torch.testing.assert_close(scorer(images, PROMPTS[:4]), expected, rtol=1e-5, atol=1e-4)


def test_aesthetic_is_the_linear_head_on_the_unit_image_embedding(scorers, clip_dir):
    images = random_images(5, seed=2)
    scores = scorers["aesthetic"](images)
    state = torch.load(os.path.join(clip_dir, AESTHETIC_FILE), weights_only=True)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        x = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # no activations in the published "linearMSE" head
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(scores, x[:, 0], rtol=1e-5, atol=1e-5)
    # prompts are ignored
    torch.testing.assert_close(scorers["aesthetic"](images, PROMPTS), scores)


def test_hps_is_the_cosine_of_open_clip_features(scorers, hps_dir):
    # 32 px square images: HPSv2's transform leaves their size alone, so the pixels are plain normalisation
    images = random_images(5, seed=4, size=(32, 32))
    scores = scorers["hps"](images, PROMPTS)
    model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None).eval()
    model.load_state_dict(torch.load(os.path.join(hps_dir, HPS_CHECKPOINTS["v2.1"]), weights_only=True)["state_dict"])
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.tensor(np.stack([(np.asarray(im) / 255.0 - mean) / std for im in images]), dtype=torch.float32)
    with torch.no_grad():
        image_features = model.encode_image(pixels.permute(0, 3, 1, 2), normalize=True)
        text_features = model.encode_text(open_clip.tokenize(PROMPTS), normalize=True)
        expected = torch.diagonal(image_features @ text_features.T)  # hpsv2.score, without a logit scale
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_hps_transform_resizes_the_longer_side_and_pads_with_black():
    x = np.linspace(0, 1, 64)
    smooth = np.stack([np.outer(np.linspace(0.2, 0.8, 32), x), np.outer(np.ones(32), x), np.full((32, 64), 0.5)], -1)
    image = PIL.Image.fromarray((255 * smooth).astype(np.uint8))  # 64 wide, 32 high -> 32 x 16, 8 rows of padding
    pixels = hps_pixel_values(image, 32)
    assert pixels.shape == (3, 32, 32)
    black = ((0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD))[:, None, None]
    torch.testing.assert_close(pixels[:, :8], black.expand(3, 8, 32))
    torch.testing.assert_close(pixels[:, 24:], black.expand(3, 8, 32))
    # open_clip's own "longest" transform (PIL resize instead of a tensor one) agrees on a smooth image
    reference = open_clip.image_transform(32, is_train=False, resize_mode="longest", fill_color=0)(image)
    torch.testing.assert_close(pixels, reference, rtol=0, atol=0.06)


# ---------------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic", "hps"])
def test_scores_do_not_depend_on_the_batch_size(scorers, name):
    scorer, images = scorers[name], random_images(5, seed=5)
    scorer.batch_size = 5
    together = scorer(images, PROMPTS)
    scorer.batch_size = 1
    one_by_one = scorer(images, PROMPTS)
    scorer.batch_size = 32
    torch.testing.assert_close(one_by_one, together, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic", "hps"])
def test_bfloat16_and_float64_models_give_float32_scores_close_to_float32(scorers, name):
    scorer, images = scorers[name], random_images(4, seed=6)
    reference = scorer(images, PROMPTS[:4])
    try:
        assert scorer.to(dtype=torch.float64) is scorer and scorer.dtype == torch.float64
        torch.testing.assert_close(scorer(images, PROMPTS[:4]), reference, rtol=1e-4, atol=1e-4)
        scorer.to(dtype=torch.bfloat16)
        low = scorer(images, PROMPTS[:4])
        assert low.dtype == torch.float32 and scorer.dtype == torch.bfloat16
        spread = reference.abs().max().item()
        torch.testing.assert_close(low, reference, rtol=0, atol=0.05 * spread + 0.02)
    finally:
        scorer.to(dtype=torch.float32)


def test_every_image_input_type_gives_the_same_score(scorers, tmp_path):
    image = random_images(1, seed=7)[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image.save(tmp_path / "image.png")
    array = np.array(image)
    inputs = [image, array, torch.from_numpy(array).permute(2, 0, 1), buffer.getvalue(), str(tmp_path / "image.png")]
    scores = scorers["clip_score"](inputs, ["a red cat"] * len(inputs))
    torch.testing.assert_close(scores, scores[:1].expand(len(inputs)))
    batch = torch.from_numpy(np.stack([array, array])).permute(0, 3, 1, 2)  # one (N, C, H, W) tensor
    torch.testing.assert_close(scorers["clip_score"](batch, ["a red cat"] * 2), scores[:2])


def test_progress_bar_only_with_several_batches(clip_dir, capfd):
    scorer = CLIPScorer.from_pretrained(clip_dir, batch_size=2)
    capfd.readouterr()
    scorer(random_images(2), PROMPTS[:2])
    assert "Scoring (clip_score)" not in capfd.readouterr().err
    scorer(random_images(3), PROMPTS[:3])
    assert "Scoring (clip_score)" in capfd.readouterr().err
    scorer.show_progress = False
    scorer(random_images(3), PROMPTS[:3])
    assert "Scoring" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(scorers):
    clip, aesthetic = scorers["clip_score"], scorers["aesthetic"]
    images = random_images(2)
    empty = clip([], [])
    assert empty.shape == (0,) and empty.dtype == torch.float32 and aesthetic([]).shape == (0,)
    with pytest.raises(ValueError, match="`prompts` has 1 entries but `images` has 2"):
        clip(images, ["one"])
    with pytest.raises(ValueError, match="`prompts` is required"):
        clip(images)
    with pytest.raises(ValueError, match="`prompts` must be a sequence of str"):
        clip(images, "a red cat")
    with pytest.raises(ValueError, match=r"`prompts\[1\]` must be a str"):
        clip(images, ["a", 3])
    with pytest.raises(ValueError, match="`images` must be a sequence"):
        clip(images[0], ["a"])
    with pytest.raises(ValueError, match="must be a batch"):
        aesthetic(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"`images\[1\]` is not a readable image"):
        aesthetic([images[0], b"not an image"])
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        CLIPScorer(clip.model, clip.tokenizer, clip.image_processor, batch_size=0)


def test_aesthetic_loading_errors(tmp_path, clip_dir):
    with pytest.raises(ValueError, match="a folder without 'missing.pth'"):
        AestheticScorer.from_pretrained(clip_dir, clip_name_or_path=clip_dir, filename="missing.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "head.pth")
    with pytest.raises(ValueError, match="Not an aesthetic predictor state dict"):
        AestheticScorer.from_pretrained(tmp_path / "head.pth", clip_name_or_path=clip_dir)
    wide = {f"layers.{i}.weight": torch.zeros(1 if i == 7 else 4, 768 if i == 0 else 4) for i in (0, 2, 4, 6, 7)}
    torch.save({**wide, **{f"layers.{i}.bias": torch.zeros(1 if i == 7 else 4) for i in (0, 2, 4, 6, 7)}},
               tmp_path / "wide.pth")  # fmt: skip
    with pytest.raises(ValueError, match="takes 768-wide embeddings but `clip_model` makes 24-wide"):
        AestheticScorer.from_pretrained(tmp_path / "wide.pth", clip_name_or_path=clip_dir)


def test_hps_loads_v2_by_file_and_refuses_pickled_objects(tmp_path, scorers):
    save_tiny_hps(tmp_path, seed=1, filename=HPS_CHECKPOINTS["v2.0"])
    file = tmp_path / HPS_CHECKPOINTS["v2.0"]
    v2 = HPSv2Scorer.from_pretrained(file, model_name=TINY_OPEN_CLIP_NAME)
    images = random_images(2, size=(32, 32))
    assert not torch.allclose(v2(images, PROMPTS[:2]), scorers["hps"](images, PROMPTS[:2]))  # other weights
    state = torch.load(file, weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=1e-5)}, file)  # a training checkpoint's pickled args
    with pytest.raises(ValueError, match=r"cannot be read with `torch.load\(weights_only=True\)`"):
        HPSv2Scorer.from_pretrained(file, model_name=TINY_OPEN_CLIP_NAME)
    with pytest.raises(ValueError, match="`model_name` 'no-such-model' is neither an open_clip model"):
        HPSv2Scorer.from_pretrained(tmp_path / HPS_CHECKPOINTS["v2.0"], model_name="no-such-model")


def test_importing_the_scorers_imports_neither_open_clip_nor_torchvision():
    import subprocess
    import sys

    code = (
        "import sys; from ppd_diffusers.evaluation import HPSv2Scorer, load_scorer; "
        "print(sorted(m for m in ('open_clip', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
