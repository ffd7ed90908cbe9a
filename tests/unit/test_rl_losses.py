"""PPO's advantages and losses against values computed by hand from the formulas (REFERENCE 7)."""

from __future__ import annotations

import math

import pytest
import torch

from megavlm.rl.losses import (
    explained_variance, gae, grpo_advantages, kl_penalty, policy_loss, terminal_rewards, tis_weights, value_loss,
)


def test_gae_gamma_lambda_one_is_monte_carlo_return_minus_value():
    """With gamma = lambda = 1 and a terminal reward R: A_t = R - V_t, returns = R."""
    torch.manual_seed(0)
    values = torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]).float()
    scores = torch.tensor([1.0, -0.5, 2.0])
    adv, ret = gae(terminal_rewards(scores, mask), values, mask, gamma=1.0, lam=1.0)
    expected = (scores[:, None] - values) * mask
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, scores[:, None] * mask, rtol=0, atol=1e-6)


def test_gae_hand_computed():
    """gamma 0.9, lambda 0.8, V = [0.5, 0.2, 0.1], r = [0, 0, 1]:
    A2 = 1 - 0.1 = 0.9; A1 = (0.9*0.1 - 0.2) + 0.72*0.9 = 0.538; A0 = (0.9*0.2 - 0.5) + 0.72*0.538 = 0.06736."""
    values = torch.tensor([[0.5, 0.2, 0.1]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.06736, 0.538, 0.9]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, adv + values)


def test_gae_masked_positions_change_nothing():
    """Masked positions inside a response (any value, any reward) leave the real positions' advantages unchanged."""
    torch.manual_seed(1)
    values = torch.randn(2, 4)
    rewards = torch.randn(2, 4)
    adv, _ = gae(rewards, values, torch.ones(2, 4), gamma=0.95, lam=0.9)
    # insert two masked slots with garbage after positions 0 and 2
    keep = [0, 2, 3, 5]
    big_v = torch.randn(2, 6) * 100
    big_r = torch.randn(2, 6) * 100
    big_v[:, keep], big_r[:, keep] = values, rewards
    mask = torch.zeros(2, 6)
    mask[:, keep] = 1
    adv2, _ = gae(big_r * mask, big_v, mask, gamma=0.95, lam=0.9)
    torch.testing.assert_close(adv2[:, keep], adv, rtol=0, atol=1e-5)
    assert adv2[:, [1, 4]].abs().max() == 0


def test_policy_loss_clip_and_dual_clip():
    logp = torch.log(torch.tensor([[1.5, 1.5, 4.0, 0.5, 1.0]]))
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, -1.0, -1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clipped = policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    # r=1.5, A=1: -min(1.5, 1.2) = -1.2 (clipped); r=1.5, A=-1: max(1.5, 1.2) = 1.5;
    # r=4, A=-1: max(4, 1.2) = 4, dual clip min(4, 3) = 3; r=0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped); masked: 0
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, 3.0, 0.8, 0.0]]), rtol=0, atol=1e-6)
    assert clipped.tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0]]
    no_dual, _ = policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=None)
    assert no_dual[0, 2].item() == pytest.approx(4.0)
    weighted, _ = policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0, is_weights=torch.full((1, 5), 0.5))
    torch.testing.assert_close(weighted, loss * 0.5)


def test_policy_loss_gradient_only_where_unclipped():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_eps=0.2)
    loss.sum().backward()
    # d(-r A)/d logp = -r A: zero at the clipped token, -1.1 at the other
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1]]))


def test_tis_weights_truncate_and_count_out_of_bound():
    old = torch.log(torch.tensor([[10.0, 2.0, 1.0, 100.0]]))
    rollout = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, oob = tis_weights(old.requires_grad_(), rollout, mask, cap=8.0)
    torch.testing.assert_close(w, torch.tensor([[8.0, 2.0, 1.0, 0.0]]))
    assert not w.requires_grad
    assert oob.item() == pytest.approx(1 / 3)


def test_value_loss_clipped():
    v = torch.tensor([[1.0, 0.0, 0.6, 0.9]])
    v_old = torch.full((1, 4), 0.5)
    ret = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    loss = value_loss(v, v_old, ret, torch.ones(1, 4), clip_eps=0.2)
    # 0.5*max(1, 0.49); 0.5*max(1, 0.49); 0.5*0.16; 0.5*max(0.01, (0.7-1)^2=0.09)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.5, 0.08, 0.045]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(value_loss(v, v_old, ret, torch.ones(1, 4), clip_eps=None), 0.5 * (v - ret) ** 2)


def test_grpo_advantages():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo_advantages(scores, groups, torch.ones(6, 2))
    # group 0: mean 0.75, unbiased std 0.5
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.5, -1.5, 0.5, 0.5, 0.0, 0.0]), rtol=0, atol=1e-5)


def test_kl_and_explained_variance():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    # k3: exp(d) - d - 1 with d = log(0.5)
    assert kl_penalty(logp, ref, torch.ones(1, 1)).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(ret, ret, torch.ones(1, 3)) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), ret, torch.ones(1, 3)) == pytest.approx(0.0)
