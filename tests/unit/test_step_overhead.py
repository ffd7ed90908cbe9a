"""Fixed costs of a 1-rank train step: megatron's collectives over a group of one rank and
the distributed optimizer's copies of fp32 main parameters onto themselves are skipped
(megavlm.training.data_parallel.skip_single_rank_collectives,
megavlm.training.optimizer.skip_aliased_param_copies); the result is bit-identical to
megatron-core's own path, which keeps them."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config import load_config
from megavlm.training import data_parallel
from megavlm.training import optimizer as optimizers


class _Tiny(MegatronModule):
    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        self.a = torch.nn.Linear(12, 16)
        self.b = torch.nn.Linear(16, 3, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _counting(monkeypatch) -> list[int]:
    """Counts megatron's coalesced gradient/parameter collectives."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    calls, original = [], buffers._coalescing_manager

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(buffers, "_coalescing_manager", counted)
    return calls


def _train(monkeypatch, overrides: list[str], skip: bool, steps: int = 3):
    """Parameters after ``steps`` steps, and what the two skips changed (with ``skip``)."""
    cfg = load_config(None, ["model.preset=qwen3-tiny", "train.lr=1e-2", *overrides])
    tconfig = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, use_cpu_initialization=True)
    torch.manual_seed(0)
    changed = {}
    with monkeypatch.context() as m:
        for module, name in ((data_parallel, "skip_single_rank_collectives"), (optimizers, "skip_aliased_param_copies")):
            original = getattr(module, name)
            m.setattr(module, name, (lambda *a, o=original, n=name: changed.setdefault(n, o(*a))) if skip else
                      (lambda *a: 0))
        model = data_parallel.wrap_data_parallel([_Tiny(tconfig)], tconfig, cfg.parallel)
        optimizer = optimizers.build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        model[0](torch.randn(8, 12, generator=g)).square().sum().backward()
        model[0].finish_grad_sync()
        optimizer.step()
    return [p.detach().clone() for p in model[0].parameters()], changed


@pytest.mark.parametrize("overrides", [
    ["parallel.distributed_optimizer=true"],
    ["parallel.distributed_optimizer=false", "parallel.overlap_grad_reduce=true"],
])
def test_single_rank_step_skips_collectives_bit_identically(single_rank_megatron, overrides, monkeypatch):
    collectives = _counting(monkeypatch)
    reference, _ = _train(monkeypatch, overrides, skip=False)
    assert collectives  # megatron's own path communicates over the 1-rank group
    collectives.clear()
    ours, changed = _train(monkeypatch, overrides, skip=True)
    assert not collectives
    assert changed["skip_single_rank_collectives"] == 1  # the one bucket group over the 1-rank DP group
    distributed = overrides[0].endswith("true")
    assert len(changed["skip_aliased_param_copies"]) == distributed  # fp32: main params are the buffer
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    initial, _ = _train(monkeypatch, overrides, skip=False, steps=0)
    assert not all(torch.equal(a, b) for a, b in zip(ours, initial))
