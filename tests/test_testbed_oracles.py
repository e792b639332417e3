"""The held-out users' oracles (the testbed guide's diagnosis, step 15): embeddings that know more than the
encoder, and the mixture experiment run with each on the same users and pairs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ppd_diffusers.testbed.experiments import mixture_experiment
from ppd_diffusers.testbed.loop import TestbedConfig, UserPairs
from ppd_diffusers.testbed.oracles import mixture_oracles, oracle_embeddings, oracles_markdown
from ppd_diffusers.testbed.rewards import SyntheticUser

from .test_testbed_loop import fake_pool
from .test_testbed_run import MICRO

MICRO_CONFIG = replace(TestbedConfig.quick(seed=3), **MICRO)


def two_users() -> list[UserPairs]:
    return [
        UserPairs(SyntheticUser("a", (0.6, 0.0, 0.8, 0.0)), np.array([0, 5]), np.array([1, 6])),
        UserPairs(SyntheticUser("b", (0.0, -1.0, 0.0, 0.0)), np.array([2]), np.array([3])),
    ]


def test_oracle_embeddings_by_hand():
    pool = fake_pool()
    users = two_users()
    like = torch.zeros(2, 1, 8)
    like[0, 0, 0], like[1, 0, 1] = 3.0, 5.0  # mean norm 4
    weights = oracle_embeddings(pool, users, "true_weights", like)
    assert weights.shape == like.shape and (weights[:, :, 4:] == 0).all()
    torch.testing.assert_close(weights[:, 0, :4], torch.tensor([[2.4, 0.0, 3.2, 0.0], [0.0, -4.0, 0.0, 0.0]]))
    z = pool.standardized
    first = ((z[0] - z[1]) + (z[5] - z[6])) / 2  # user a's mean preferred-minus-rejected reward difference
    differences = oracle_embeddings(pool, users, "reward_differences", like)
    torch.testing.assert_close(differences[0, 0, :4], first / first.norm() * 4)
    torch.testing.assert_close(differences[1, 0, :4], (z[2] - z[3]) / (z[2] - z[3]).norm() * 4)


def test_oracle_embeddings_refuse_an_unknown_kind_or_a_mismatched_shape():
    pool, users = fake_pool(), two_users()
    with pytest.raises(ValueError, match="`kind` must be one of"):
        oracle_embeddings(pool, users, "one_hot", torch.zeros(2, 1, 8))
    for like in (torch.zeros(3, 1, 8), torch.zeros(2, 1, 3), torch.zeros(2, 8)):
        with pytest.raises(ValueError, match="`like` must be"):
            oracle_embeddings(pool, users, "true_weights", like)
    with pytest.raises(ValueError, match="`kinds` must be among"):
        mixture_oracles(MICRO_CONFIG, kinds=("encoder", "one_hot"))


def test_mixture_oracles_run_each_kind_on_the_same_users_and_the_encoder_kind_is_the_plain_experiment():
    from ppd_diffusers.clip_preference_encoder import CLIPPreferenceEncoder
    from ppd_diffusers.testbed.base_model import load_base_pipeline
    from ppd_diffusers.testbed.encoder import ENCODER_DIR
    from ppd_diffusers.testbed.loop import make_pool

    results = mixture_oracles(MICRO_CONFIG)
    assert list(results) == ["encoder", "reward_differences", "true_weights"]
    pipe = load_base_pipeline()
    torch.manual_seed(MICRO_CONFIG.seed)
    pool = make_pool(pipe, MICRO_CONFIG)
    encoder = CLIPPreferenceEncoder.from_pretrained(str(ENCODER_DIR), pooling="mean")
    plain = mixture_experiment(pipe, pool, encoder, MICRO_CONFIG, np.random.default_rng(MICRO_CONFIG.seed))
    assert results["encoder"] == plain
    for section in results.values():
        assert section["heldout_users"]["users"] == MICRO["num_heldout_users"]
    table = oracles_markdown(results)
    assert table.count("\n") == 5 and "| true_weights | " in table and "brightness / saturation" in table
