"""Loss weights of the three normalization modes (REFERENCE 6)."""

from __future__ import annotations

import math

import pytest
import torch

from megavlm.training.losses import sample_weights


def test_per_token_weights_are_the_mask():
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert torch.equal(sample_weights(mask, None, "per_token"), mask)


def test_packed_samples_get_their_own_counts():
    # one packed row: sample 0 has 3 supervised tokens, sample 1 has 1, then padding (-1)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, -1, -1]])
    w = sample_weights(mask, ids, "sqrt")
    expected = torch.tensor([[0, 1 / math.sqrt(3)] * 1 + [1 / math.sqrt(3)] * 2 + [0, 1.0, 0, 0]])
    assert torch.allclose(w, expected)
    # per sample: each sample's weights sum to 1, so the denominator counts samples
    per_sample = sample_weights(mask, ids, "per_sample")
    assert torch.allclose(per_sample[0, :4].sum(), torch.tensor(1.0))
    assert torch.allclose(per_sample.sum(), torch.tensor(2.0))


def test_unpacked_rows_are_samples():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    w = sample_weights(mask, None, "sqrt")
    assert torch.allclose(w.sum(dim=1), torch.tensor([2.0, 1.0]))  # sqrt(4), sqrt(1)


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match="train.loss_normalization"):
        sample_weights(torch.ones(1, 2), None, "mean")
