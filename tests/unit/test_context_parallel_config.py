"""Context-parallel and recompute configuration: validation, what megatron receives, numerics.

The multi-rank numerics (ring attention, the VLM at CP=2 against CP=1) are in
test_ring_attention.py and tests/parallel; this file holds the single-process parts.
"""

from __future__ import annotations

import re

import pytest
import torch

from megavlm.config import ConfigError, load_config, validate
from megavlm.data.build import pack_alignment, training_rows
from megavlm.models.build import build_model_chunks
from megavlm.models.transformer_config import transformer_config
from megavlm.parallel.context import shard_for_cp
from megavlm.platform.distributed import seed_everything
from megavlm.training.step import forward_step

VLM = ["model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal", "data.pack=true", "data.seq_length=128",
       "data.min_pixels=4096", "data.max_pixels=16384"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.cp=2", "data.seq_length=130"], "must be a multiple of 2 x parallel.cp = 4"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=132"],
     "2 x parallel.cp x parallel.tp (sequence parallelism) = 8"),
    (["parallel.cp=2", "parallel.cp_comm_type=a2a"], "parallel.cp_comm_type=a2a needs Transformer Engine"),
    (["parallel.cp=2", "parallel.cp_comm_type=ring"], "parallel.cp_comm_type: 'ring' is not one of"),
    (["parallel.cp=4", "parallel.cp_comm_type=a2a", "model.language.num_attention_heads=2",
      "model.language.num_query_groups=2"], "must be a multiple of parallel.cp (4)"),
    (["parallel.vision_cp_split=true"], "parallel.vision_cp_split=true needs parallel.cp > 1"),
    (["parallel.cp=2", "data.pack_align=6"], "data.pack_align (6) must be a multiple of 2 x parallel.cp (4)"),
    (["train.recompute.granularity=everything"], "train.recompute.granularity: 'everything' is not one of"),
    (["train.recompute.granularity=full", "train.recompute.num_layers=3", "model.vision.deepstack_layers=[]"],
     "train.recompute.num_layers (3) must divide"),
    (["train.recompute.granularity=full"], "train.recompute.granularity=full is not supported with DeepStack"),
])
def test_context_parallel_config_errors_name_the_key(overrides, message):
    cfg = load_config(None, VLM + overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, world_size=8)


def test_cp_with_1d_rope_needs_transformer_engine_on_cpu():
    cfg = load_config(None, ["model.preset=qwen3-tiny", "parallel.cp=2", "data.seq_length=64"])
    with pytest.raises(ConfigError, match=r"model.rope.kind=rope needs Transformer Engine"):
        validate(cfg, world_size=2)


def test_cp_layouts_validate_on_cpu():
    for extra in ([], ["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.pp=2"],
                  ["parallel.vision_cp_split=true"]):
        validate(load_config(None, VLM + ["parallel.cp=2", *extra]), world_size=8)


def test_cp_comm_type_and_recompute_reach_megatron():
    cfg = load_config(None, VLM + ["parallel.cp=2", "train.recompute.granularity=full", "model.vision.deepstack_layers=[]",
                                   "train.recompute.method=block", "train.recompute.num_layers=2"])
    t = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False, recompute=cfg.train.recompute)
    assert (t.context_parallel_size, t.cp_comm_type) == (2, "p2p")
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "block", 2)
    cfg = load_config(None, VLM + ["train.recompute.granularity=selective"])
    t = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False, recompute=cfg.train.recompute)
    assert t.recompute_granularity == "selective" and t.recompute_modules == ["core_attn"]
    cfg = load_config(None, VLM)
    t = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False, recompute=cfg.train.recompute)
    assert t.recompute_granularity is None and t.cp_comm_type is None


def test_packer_reserves_room_for_cp_padding():
    """Under CP every packed sample is padded to a multiple of 2 x CP; the packer counts it, so
    every row of the synthetic mix shards without growing (TE's THD rule, no refusal)."""
    cfg = load_config(None, VLM + ["parallel.cp=4"])
    assert pack_alignment(cfg) == 8
    rows = training_rows(cfg)
    for i in range(12):
        b = rows[i]
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        for rank in range(4):
            shard = shard_for_cp(tokens=b.tokens, labels=b.labels, loss_mask=b.loss_mask, loss_weights=None,
                                 position_ids=b.position_ids, cu_seqlens=b.cu_seqlens, sample_ids=b.sample_ids,
                                 cp_size=4, cp_rank=rank, pad_token_id=0)
            assert shard.labels.shape == (1, 32) and shard.position_ids.shape == (3, 1, 32), lengths
            padded = shard.packed_seq_params.cu_seqlens_q_padded
            assert bool(((padded[1:] - padded[:-1]) % 8 == 0).all()) and int(padded[-1]) == 128
        # the supervised tokens survive the move: each rank's share sums to the whole
        total = sum(float(shard_for_cp(tokens=b.tokens, labels=b.labels, loss_mask=b.loss_mask, loss_weights=None,
                                       position_ids=b.position_ids, cu_seqlens=b.cu_seqlens, sample_ids=b.sample_ids,
                                       cp_size=4, cp_rank=r, pad_token_id=0).loss_mask.sum()) for r in range(4))
        assert total == float(b.loss_mask.sum())


@pytest.mark.usefixtures("single_rank_megatron")
@pytest.mark.parametrize("granularity, model_keys", [("selective", []), ("full", ["model.vision.deepstack_layers=[]"])])
def test_recompute_gives_the_same_gradients(granularity, model_keys):
    """Activation recompute changes memory, not math: gradients equal the run without it."""
    grads = {}
    for mode in (None, granularity):
        extra = model_keys + ([] if mode is None else [f"train.recompute.granularity={mode}"])
        cfg = load_config(None, VLM + extra)
        seed_everything(1)
        (model,), _ = build_model_chunks(cfg)
        batch = training_rows(cfg)[0]
        output, loss_fn = forward_step(iter([batch]), model)
        loss_fn(output)[0].backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref, got = grads[None], grads[granularity]
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) == 0.0
