"""Packing: bins fit, rows are deterministic, and attention/labels never cross samples."""

from __future__ import annotations

import pytest
import torch
from megatron.core.utils import unwrap_model

from megavlm.config import load_config
from megavlm.data.packing import PackedDataset, first_fit_decreasing, pack
from megavlm.data.synthetic_text import SyntheticTextDataset
from megavlm.models.build import build_model_chunks
from megavlm.training.step import packed_seq_params, token_loss_sum


def test_first_fit_decreasing_fits_and_covers():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    bins = first_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 9+1, 8+2, 7+3, 5+5: the optimum for a total of 40
    with pytest.raises(ValueError, match="sample 2 has 9 tokens, more than data.seq_length=8"):
        first_fit_decreasing(lengths, capacity=8)


def test_pack_boundaries_and_padding():
    source = SyntheticTextDataset(vocab_size=256, seq_length=16, seed=3, min_length=4)
    samples = [source[0], source[1]]
    row = pack(samples, seq_length=40)
    n0, n1 = (s.tokens.shape[-1] for s in samples)
    assert row.cu_seqlens.tolist() == [0, n0, n0 + n1, 40]
    assert row.position_ids[0, n0].item() == 0  # positions restart per sample
    assert row.loss_mask[0, n0 + n1:].sum() == 0  # padding carries no loss
    # labels of a sample are its own next tokens, never the next sample's first token
    assert torch.equal(row.labels[0, :n0], samples[0].labels[0])


def test_packed_dataset_is_deterministic_and_reports_padding():
    source = SyntheticTextDataset(vocab_size=256, seq_length=32, seed=3, min_length=4)
    a, b = PackedDataset(source, seq_length=32, buffer_size=16), PackedDataset(source, seq_length=32, buffer_size=16)
    assert torch.equal(a[5].tokens, b[5].tokens) and torch.equal(a[5].cu_seqlens, b[5].cu_seqlens)
    assert 0.0 <= a.padding_fraction() < 0.5


@pytest.mark.usefixtures("single_rank_megatron")
def test_packed_loss_equals_sum_of_unpacked_samples():
    cfg = load_config(None, ["model.preset=qwen3-tiny"])
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk).eval()
    source = SyntheticTextDataset(vocab_size=256, seq_length=20, seed=9, min_length=5)
    samples = [source[i] for i in range(3)]
    row = pack(samples, seq_length=64)
    with torch.no_grad():
        packed = model(row.tokens, row.position_ids, labels=row.labels,
                       packed_seq_params=packed_seq_params(row.cu_seqlens))
        packed_sum, packed_count, _ = token_loss_sum(row.loss_mask, None, packed)
        separate = [token_loss_sum(s.loss_mask, None, model(s.tokens, s.position_ids, labels=s.labels)) for s in samples]
    assert packed_count == sum(n for _, n, _ in separate)
    torch.testing.assert_close(packed_sum, sum(l for l, _, _ in separate), atol=1e-4, rtol=1e-5)
