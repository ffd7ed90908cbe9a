"""Step fixed costs and GPU knobs: the patch embedding as a linear layer, torch's fused
AdamW inside megatron's optimizer, and the configs megatron-core receives for the
communication-overlap and uneven-pipeline keys. No process group: pure construction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megavlm.config import ConfigError, load_config, validate
from megavlm.config.vision import VisionConfig
from megavlm.models.deepstack import late_levels
from megavlm.models.transformer_config import transformer_config
from megavlm.models.vision.embeddings import PatchEmbed
from megavlm.planning.layout import Layout
from megavlm.planning.params import chunk_layer_range
from megavlm.planning.planner import _stage_splits
from megavlm.training import data_parallel
from megavlm.training.optimizer import optimizer_config, use_fused_torch_adam
from megavlm.training.step import packed_seq_params


def _patch_embed() -> PatchEmbed:
    vision = VisionConfig(kind="qwen3vl", num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                          patch_size=4, temporal_patch_size=2, in_channels=3)
    return PatchEmbed(vision)


def _conv_reference(embed: PatchEmbed, pixels: torch.Tensor) -> torch.Tensor:
    """The released module's math: Conv3d with kernel = stride over each [C, T, P, P] patch."""
    return embed.proj(pixels.view(-1, *embed.shape)).flatten(1)


def test_patch_embed_linear_equals_conv3d_exactly():
    embed = _patch_embed()
    # Small integers: every product and partial sum is exact in fp32, so any summation
    # order (GEMM or convolution) must give bit-identical results.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.randint(-4, 5, embed.proj.weight.shape, generator=g).float())
        embed.proj.bias.copy_(torch.randint(-4, 5, embed.proj.bias.shape, generator=g).float())
    pixels = torch.randint(-8, 9, (10, 3 * 2 * 4 * 4), generator=g).float()
    assert torch.equal(embed(pixels), _conv_reference(embed, pixels))
    # random fp32: the same up to summation order
    torch.nn.init.normal_(embed.proj.weight)
    pixels = torch.randn(10, 96, generator=g)
    torch.testing.assert_close(embed(pixels), _conv_reference(embed, pixels), rtol=1e-5, atol=1e-5)
    # checkpoints and HF conversion see the released Conv3d parameters unchanged
    assert {k: tuple(v.shape) for k, v in embed.state_dict().items()} == {
        "proj.weight": (32, 3, 2, 4, 4), "proj.bias": (32,)}


def test_patch_embed_gradients_equal_conv3d():
    embed = _patch_embed()
    pixels = torch.randn(6, 96, generator=torch.Generator().manual_seed(1))
    embed(pixels).square().sum().backward()
    ours = [p.grad.clone() for p in embed.parameters()]
    embed.zero_grad()
    _conv_reference(embed, pixels).square().sum().backward()
    for a, p in zip(ours, embed.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((37, 5), (11,), (3, 3, 3))]


def test_fused_adamw_matches_torch_reference_and_survives_load():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, ref = _params(0), _params(0)
    inner = torch.optim.AdamW(ours, **kwargs)
    fresh_state = inner.state_dict()  # as an older checkpoint: param groups without "fused"
    reference = torch.optim.AdamW(ref, foreach=False, **kwargs)  # torch's plain loop
    assert use_fused_torch_adam(SimpleNamespace(optimizer=inner)) == [inner]
    for step in range(3):
        g = torch.Generator().manual_seed(10 + step)
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        inner.step()
        reference.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    fresh_state["param_groups"][0].pop("fused", None)
    inner.load_state_dict(fresh_state)
    assert inner.param_groups[0]["fused"] is True
    # anything that is not torch's AdamW (TE/apex FusedAdam, SGD) is left alone
    sgd = torch.optim.SGD(_params(1), lr=0.1)
    assert use_fused_torch_adam(SimpleNamespace(optimizer=sgd)) == []


def _cfg(*overrides: str):
    return load_config(None, ["model.preset=qwen3-tiny", *overrides])


def test_ddp_config_gets_overlap_keys(monkeypatch):
    cpu = data_parallel.ddp_config(_cfg().parallel)
    assert (cpu.overlap_grad_reduce, cpu.overlap_param_gather) == (False, False)  # auto on CPU
    monkeypatch.setattr(data_parallel.device, "has_cuda", lambda: True)
    gpu = data_parallel.ddp_config(_cfg().parallel)
    assert (gpu.overlap_grad_reduce, gpu.overlap_param_gather, gpu.use_distributed_optimizer) == (True, True, True)
    no_distopt = data_parallel.ddp_config(_cfg("parallel.distributed_optimizer=false").parallel)
    assert (no_distopt.overlap_grad_reduce, no_distopt.overlap_param_gather) == (True, False)
    off = data_parallel.ddp_config(_cfg("parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false").parallel)
    assert (off.overlap_grad_reduce, off.overlap_param_gather) == (False, False)


def test_optimizer_config_is_megatrons():
    oc = optimizer_config(_cfg("train.lr=2e-4", "train.clip_grad=0.5", "parallel.distributed_optimizer=false"))
    assert (oc.optimizer, oc.lr, oc.clip_grad, oc.use_distributed_optimizer) == ("adam", 2e-4, 0.5, False)


def test_transformer_config_gets_uneven_stages():
    cfg = _cfg("parallel.pp=2", "parallel.first_stage_layers=1")
    tc = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False)
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (1, None)
    assert tc.tp_comm_overlap is False
    validate(cfg, world_size=2)
    # the first stage (with the ViT) takes 1 of 4 layers: DeepStack levels 2 and 3 go later
    assert late_levels(levels=3, num_layers=4, pp=2, vpp=None, first_stage_layers=1) == 2


@pytest.mark.parametrize("overrides, world, key", [
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"], 1, "parallel.overlap_param_gather"),
    (["parallel.tp_comm_overlap=true"], 1, "parallel.tp_comm_overlap"),
    (["parallel.first_stage_layers=1"], 1, "parallel.first_stage_layers needs parallel.pp >= 2"),
    (["parallel.pp=2", "parallel.first_stage_layers=4"], 2, "leave 0 of model.language.num_layers"),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.last_stage_layers=2"], 2, "parallel.vpp > 1"),
])
def test_bad_knobs_fail_naming_the_key(overrides, world, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        validate(_cfg(*overrides), world_size=world)


def test_planner_accounts_for_uneven_stages():
    layout = Layout(pp=4, first_stage_layers=6)
    assert layout.stage_layers(36) == [6, 10, 10, 10]
    assert [chunk_layer_range(36, layout, r, 0) for r in range(4)] == [
        range(0, 6), range(6, 16), range(16, 26), range(26, 36)]
    assert Layout(pp=3, first_stage_layers=2, last_stage_layers=3).stage_layers(9) == [2, 4, 3]
    assert "parallel.first_stage_layers=6" in layout.overrides()
    assert _stage_splits(36, 4, 1, {}) == [(None, None), (6, None)]
    assert _stage_splits(36, 4, 2, {}) == [(None, None)]  # no uneven split when interleaved
    assert _stage_splits(36, 1, 1, {}) == [(None, None)]


def test_packed_seq_params_reads_lengths_on_the_host():
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    p = packed_seq_params(cu, torch.device("cpu"))
    assert (p.max_seqlen_q, p.max_seqlen_kv) == (7, 7)
    assert torch.equal(p.cu_seqlens_q, cu)


def test_cuda_graph_reaches_megatron_and_is_refused_without_cuda_and_te(monkeypatch):
    from megatron.core.transformer.enums import CudaGraphScope

    from megavlm.platform import device

    cfg = _cfg("train.cuda_graph=local", "train.cuda_graph_scope=[attn,mlp]")
    with pytest.raises(ConfigError, match=r"train\.cuda_graph=local needs CUDA and Transformer Engine"):
        validate(cfg, world_size=1)  # this machine: no CUDA
    monkeypatch.setattr(device, "has_cuda", lambda: True)
    monkeypatch.setattr(device, "has_transformer_engine", lambda: True)
    validate(cfg, world_size=1)
    tc = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False,
                            cuda_graph=cfg.train.cuda_graph, cuda_graph_scope=cfg.train.cuda_graph_scope)
    assert (tc.cuda_graph_impl, tc.cuda_graph_scope) == ("local", [CudaGraphScope.attn, CudaGraphScope.mlp])
    whole = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False, cuda_graph="local")
    assert whole.cuda_graph_scope == []  # megatron: the whole layer
    off = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False)
    assert off.cuda_graph_impl == "none"
    for overrides, key in [
        (["train.cuda_graph=transformer_engine"], "train.cuda_graph"),
        (["train.cuda_graph=local", "train.cuda_graph_scope=[full_iteration]"], "train.cuda_graph_scope"),
        (["train.cuda_graph=local", "train.cuda_graph_scope=[moe_router]"], "need a MoE model"),
        (["train.cuda_graph=local", "train.recompute.granularity=full"], "recompute.granularity=full"),
        (["train.cuda_graph_scope=[attn]"], "needs train.cuda_graph=local"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(_cfg(*overrides), world_size=1)
