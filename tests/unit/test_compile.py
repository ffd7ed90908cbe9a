"""train.compile: a compiled decoder layer trains like the eager one.

Cost (measured on the 2-core box under heavy load, so upper bounds): one dynamo trace and
inductor compile of a 1-layer decoder's forward and backward (C++ kernels), about 15 s of
CPU with inductor's on-disk cache warm (the pytest process: 30 s user including ~15 s of
imports) and about 40 s cold. This is the one expensive test of train.compile; the rest of
the key (validation-free, a bool) needs none.
"""

from __future__ import annotations

import torch

from megavlm.config import load_config
from megavlm.models.build import build_model_chunks
from megavlm.training.compile import compile_layers


def _loss_and_grads(model, tokens, positions):
    model.zero_grad(set_to_none=True)
    losses = model(tokens, positions, labels=tokens.roll(-1, dims=1))  # [b, s] token losses
    loss = losses.float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_layer_equals_eager(single_rank_megatron):
    cfg = load_config(None, ["model.preset=qwen3-tiny", "model.language.num_layers=1", "data.seq_length=32",
                             "train.compile=true"])
    [eager], _ = build_model_chunks(cfg)
    [compiled], _ = build_model_chunks(cfg)  # layout-invariant init from train.seed: the same weights
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), compiled.parameters()))
    assert compile_layers([compiled]) == 1
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.language.vocab_size, (2, 32), generator=g)
    positions = torch.arange(32).expand(2, 32)
    for _ in range(2):  # the second call runs the cached compiled graph
        loss, grads = _loss_and_grads(compiled, tokens, positions)
    ref_loss, ref_grads = _loss_and_grads(eager, tokens, positions)
    # Same math, fp32, different summation order and fused elementwise kernels (inductor
    # fuses RMSNorm, RoPE and SwiGLU; its reductions reassociate): each value differs by a
    # few ulps of the terms it sums (hidden 64, sequence 32), far below 1e-5 of the values.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # the compiled module is the same module: parameter names (checkpoints) are unchanged
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
