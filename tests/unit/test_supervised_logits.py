"""train.supervised_logits_only: logits and cross entropy only where the loss mask is set.

Reference: megatron-core's own GPTModel path (every position projected), on the same model
and batch. Layout parity (TP+SP, PP, CP against one rank) runs with the option on in
tests/parallel, which is where the sequence-parallel gather and gradient are checked.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.utils import unwrap_model

from megavlm.config import load_config
from megavlm.models.build import build_model_chunks


def _losses_and_grads(model, tokens, positions, labels, loss_mask, weight=1.0):
    model.zero_grad(set_to_none=True)
    losses = model(tokens, positions, labels=labels, loss_mask=loss_mask)  # [b, s]
    (losses * torch.linspace(0.5, 1.5, losses.numel()).view_as(losses) * weight).sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("single_rank_megatron")
@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen3vl-tiny"])
def test_losses_and_gradients_equal_the_full_vocabulary_projection(preset):
    cfg = load_config(None, [f"model.preset={preset}", "data.seq_length=24"])
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk)
    g = torch.Generator().manual_seed(0)
    vocab = cfg.model.language.vocab_size
    tokens = torch.randint(10, vocab, (2, 24), generator=g)
    labels = torch.randint(10, vocab, (2, 24), generator=g)
    loss_mask = (torch.rand(2, 24, generator=g) < 0.4).float()
    loss_mask[1, :] = 0  # a row with nothing supervised
    loss_mask[0, 3] = 1
    positions = torch.arange(24).expand(2, 24)
    if preset == "qwen3vl-tiny":
        positions = positions.expand(3, 2, 24).clone()
    ref, _ = _losses_and_grads(model, tokens, positions, labels, None)
    out, grads = _losses_and_grads(model, tokens, positions, labels, loss_mask)
    keep = loss_mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-6, atol=1e-6)
    assert torch.all(out[~keep] == 0)
    # gradients: the full projection with the unsupervised positions' losses masked out
    _, ref_grads = _losses_and_grads(model, tokens, positions, labels, None, weight=loss_mask)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        # Fewer rows in the vocabulary GEMMs reorder fp32 sums over tokens: each element may
        # differ by about (tokens x eps) of the tensor's largest term (24 x 1.2e-7 < 1e-5).
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    # nothing supervised at all: zero loss, and the step still runs
    empty, _ = _losses_and_grads(model, tokens, positions, labels, torch.zeros(2, 24))
    assert torch.all(empty == 0)
