"""Each link of the testbed's loop on its own: pair labels, the probe, win rates, bootstrap, plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppd_diffusers.testbed.evaluate import bootstrap_ci, identification_probe, win_rates
from ppd_diffusers.testbed.loop import PairPool, TestbedConfig, user_pairs
from ppd_diffusers.testbed.report import interpolation_figure, multi_reward_figure
from ppd_diffusers.testbed.rewards import RewardScaler, SyntheticUser, random_users
from ppd_diffusers.testbed.training import StratifiedStageCObjective, _ema_update


def fake_pool(prompts: int = 3, per_prompt: int = 5, seed: int = 0) -> PairPool:
    g = torch.Generator().manual_seed(seed)
    standardized = torch.randn(prompts * per_prompt, 4, generator=g)
    return PairPool(
        latents=torch.randn(prompts * per_prompt, 3, 16, 16, generator=g),
        prompt_index=np.repeat(np.arange(prompts), per_prompt),
        standardized=standardized,
        scaler=RewardScaler(torch.zeros(4), torch.ones(4)),
    )


def test_user_pairs_are_same_prompt_distinct_and_labelled_by_the_judge():
    pool = fake_pool()
    for user in random_users(5, np.random.default_rng(0)):
        pairs = user_pairs(pool, user, 200, np.random.default_rng(1))
        assert np.all(pool.prompt_index[pairs.chosen] == pool.prompt_index[pairs.rejected])
        assert np.all(pairs.chosen != pairs.rejected)
        assert torch.all(user.score(pool.standardized[pairs.chosen]) > user.score(pool.standardized[pairs.rejected]))
        profile, training = pairs.split(4)
        assert len(profile.chosen) == 4 and len(training.chosen) == 196
        assert np.array_equal(np.concatenate([profile.chosen, training.chosen]), pairs.chosen)


def test_opposite_users_label_every_pair_the_other_way():
    pool = fake_pool()
    bright, dark = SyntheticUser("bright", (1.0, 0, 0, 0)), SyntheticUser("dark", (-1.0, 0, 0, 0))
    a = user_pairs(pool, bright, 50, np.random.default_rng(3))
    b = user_pairs(pool, dark, 50, np.random.default_rng(3))
    assert np.array_equal(a.chosen, b.rejected) and np.array_equal(a.rejected, b.chosen)


def test_identification_probe_separable_and_random_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 8, generator=g) * 5
    separable = (centres[:, None] + 0.1 * torch.randn(10, 4, 8, generator=g)).reshape(40, 8)
    result = identification_probe(separable, draws=4)
    assert result["top1"] == 1.0 and result["chance_top1"] == 0.1 and result["users"] == 10
    noise = identification_probe(torch.randn(40, 8, generator=g), draws=4)
    assert noise["top1"] <= 0.5


def test_win_rates_and_bootstrap():
    user = SyntheticUser("bright", (1.0, 0, 0, 0))
    base = torch.zeros(1, 4, 4)
    mine = torch.zeros(1, 4, 4)
    mine[0, :3, 0] = 1  # 3 of 4 samples brighter, one tie
    assert win_rates([user], mine, base)[0] == (3 + 0.5) / 4
    low, high = bootstrap_ci(np.array([0.5, 0.6, 0.7, 0.8]), np.random.default_rng(0))
    assert 0.5 <= low <= 0.65 <= high <= 0.8


def test_figures_have_titled_axes_and_a_legend():
    rewards = {"brightness": [2, 1, 0], "warmth": [0, 1, 2]}
    path = {"users": ["brightness", "warmth"], "weights": [0, 0.5, 1], "rewards": rewards}
    row = {"base": 0.0, "pooled_dpo": 0.2, "ppd": 0.8, "single_reward_dpo": 1.0, "share_of_bound": 0.8}
    multi = {"steps": 3, "pairs_per_step": 2, "per_reward": {"brightness": row, "warmth": row}}
    for figure in (interpolation_figure(path), multi_reward_figure(multi)):
        (axes,) = figure.axes
        assert axes.get_xlabel() and axes.get_ylabel() and axes.get_title()
        assert axes.get_legend() is not None
    (axes,) = interpolation_figure(path).axes
    assert [line.get_label() for line in axes.get_lines()] == ["brightness", "warmth"]
    assert list(axes.get_lines()[1].get_ydata()) == [0, 1, 2]
    (axes,) = multi_reward_figure(multi).axes
    assert [t.get_text() for t in axes.get_xticklabels()] == ["brightness", "warmth"]
    assert len(axes.patches) == 8  # 4 methods x 2 rewards


def test_tie_margin_drops_pairs_the_user_scores_alike_and_fails_clearly_when_none_differ():
    pool = fake_pool(per_prompt=8)
    user = random_users(1, np.random.default_rng(0))[0]
    pairs = user_pairs(pool, user, 100, np.random.default_rng(1), tie_margin=1.0)
    gap = user.score(pool.standardized[pairs.chosen]) - user.score(pool.standardized[pairs.rejected])
    scores = user.score(pool.standardized).view(3, 8)  # 3 prompts of 8 images
    within = (scores - scores.mean(1, keepdim=True)).std()  # the margin's unit: the spread within a prompt
    assert len(pairs.chosen) == 100 and torch.all(gap > within) and gap.min() < 1.5 * within
    assert np.all(pool.prompt_index[pairs.chosen] == pool.prompt_index[pairs.rejected])
    # without a margin the same generator draws the pairs it always drew, ties included
    plain = user_pairs(pool, user, 100, np.random.default_rng(1))
    plain_gap = user.score(pool.standardized[plain.chosen]) - user.score(pool.standardized[plain.rejected])
    assert (plain_gap <= within).any()
    flat = SyntheticUser("flat", (0.0, 0.0, 0.0, 0.0))  # scores every image alike: every pair is a tie
    with pytest.raises(ValueError, match="tie_margin"):
        user_pairs(pool, flat, 10, np.random.default_rng(0), tie_margin=0.5)


def test_stratified_timesteps_put_one_draw_in_each_stratum():
    t = StratifiedStageCObjective().sample_timesteps(16, generator=torch.Generator().manual_seed(0))
    assert t.shape == (16,) and torch.equal(torch.sort((t * 16).floor()).values, torch.arange(16.0))
    assert not torch.equal((t * 16).floor(), torch.arange(16.0))  # in random order across the pairs


def test_ema_update_warms_up_then_averages():
    adapter = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(adapter.weight)
    averaged = [adapter.weight.detach().clone()]
    with torch.no_grad():
        adapter.weight.fill_(1.0)
    _ema_update(averaged, adapter, decay=0.9, step=0)  # warm-up rate (1 + 0) / (10 + 0) = 0.1
    assert averaged[0].item() == pytest.approx(0.9)
    _ema_update(averaged, adapter, decay=0.9, step=1000)  # the decay itself
    assert averaged[0].item() == pytest.approx(0.9 + (1 - 0.9) * (1.0 - 0.9))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tie_margin", -0.5),
        ("ema_decay", 1.0),
        ("ema_decay", -0.1),
        ("learning_rate", 0.0),
        ("beta", -1.0),
        ("user_dropout", 1.0),
        ("user_guidance_scale", -1.0),
        ("timestep_weighting", "snr"),
        ("workers", 0),
        ("dpo_steps", 2.5),
        ("pool_per_prompt", 1),
        ("probe_draws", 1),
        ("sample_steps", True),
        ("prompts", []),
    ],
)
def test_a_bad_config_value_is_refused_naming_its_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TestbedConfig(**{field: value})


def test_the_shipped_configs_and_their_edge_values_are_accepted():
    for config in (TestbedConfig.quick(3), TestbedConfig.full(3)):
        assert config.seed == 3
    edges = dict(tie_margin=0.0, ema_decay=0.0, user_guidance_scale=None, user_dropout=0.0, eval_train_users=0)
    assert TestbedConfig(**edges).tie_margin == 0.0
