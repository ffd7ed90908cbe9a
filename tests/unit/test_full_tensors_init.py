"""``initialize_layout_invariant`` draws per layer (per expert) and per tile, never per stack.

Layout invariance across real TP/PP/VPP/EP launches is in tests/parallel/test_layouts.py;
here we cut the real shard descriptions of tiny models into other layouts in-process (any
TP-like split, any PP-like subset of layers, a different padding of the vocabulary) and
check that every piece gets the values of the same place in the single-rank model, and
that no rank ever draws more than a tile (hence never a whole ``[num_layers, ...]`` stack).
"""

from __future__ import annotations

import math

import pytest
import torch

from megavlm.config import load_config
from megavlm.models import full_tensors
from megavlm.models.full_tensors import INIT_TILE, Shard, initialize_shard, iter_shards
from megavlm.models.build import build_model_chunks

INIT = dict(seed=7, std=0.02, num_layers=4, vocab_size=1000)


@pytest.fixture
def draws(monkeypatch) -> list[int]:
    """numel of every random draw ``full_tensors`` makes."""
    sizes: list[int] = []
    draw = full_tensors._draw

    def recording(shape, generator):
        sizes.append(math.prod(shape))
        return draw(shape, generator)

    monkeypatch.setattr(full_tensors, "_draw", recording)
    return sizes


def _shard(key, global_shape, offset, local_shape, p) -> Shard:
    return Shard(key=key, data=torch.full(local_shape, float("nan")), global_shape=tuple(global_shape),
                 global_offset=tuple(offset), prepend_axis_num=p)


def _pieces(shard: Shard, dim: int, parts: int) -> list[Shard]:
    """``shard`` cut into ``parts`` uneven pieces along local ``dim`` (a TP-like split)."""
    n = shard.data.shape[dim]
    bounds = sorted({0, n, *[round(n * (i + 0.37) / parts) for i in range(1, parts)]})
    out = []
    for a, b in zip(bounds, bounds[1:]):
        offset = list(shard.global_offset)
        offset[shard.prepend_axis_num + dim] += a
        shape = list(shard.data.shape)
        shape[dim] = b - a
        out.append(_shard(shard.key, shard.global_shape, offset, shape, shard.prepend_axis_num))
    return out


def _assemble(shards: list[Shard], **init) -> dict[str, torch.Tensor]:
    """Initialize the shards and place them in full tensors (NaN where nobody wrote)."""
    full: dict[str, torch.Tensor] = {}
    for sh in shards:
        initialize_shard(sh, **init)
        target = full.setdefault(sh.key, torch.full(sh.global_shape, float("nan")))
        target[sh.slices()] = sh.data.reshape(target[sh.slices()].shape)
    return full


def test_slices_of_any_split_equal_the_whole_layer(draws):
    """A stacked [L, E, R, C] key and a padded vocabulary: every TP-like split, along rows
    or columns, uneven and not tile-aligned, reproduces the unsplit layer (per layer, per
    expert); every draw is at most one tile; layers and experts differ."""
    R, C = 600, 520  # neither a multiple of INIT_TILE nor of the splits
    stacked = [_shard("decoder.layers.mlp.experts.linear_fc1.weight", (4, 3, R, C), (l, e, 0, 0), (R, C), 2)
               for l in range(4) for e in range(3)]
    ref = _assemble(stacked, **INIT)
    assert max(draws) <= INIT_TILE * INIT_TILE
    w = ref["decoder.layers.mlp.experts.linear_fc1.weight"]
    assert not w.isnan().any() and 0.019 < w.std() < 0.021
    assert not torch.equal(w[0, 0], w[1, 0]) and not torch.equal(w[0, 0], w[0, 1])
    for dim, parts in [(0, 3), (1, 5), (0, 7)]:
        pieces = [p for sh in stacked for p in _pieces(sh, dim, parts)]
        got = _assemble(pieces, **INIT)["decoder.layers.mlp.experts.linear_fc1.weight"]
        assert torch.equal(got, w), (dim, parts)
    # a vocabulary padded for TP=3 or TP=8: the same real rows, zeros after (also for a
    # vocabulary smaller than a tile, where a tile must not grow into the padding)
    for vocab in (1000, 99):
        key = "output_layer.weight"
        init = {**INIT, "vocab_size": vocab}
        whole = _assemble([_shard(key, (vocab, 100), (0, 0), (vocab, 100), 0)], **init)[key]
        for tp in (3, 8):
            rows = -(-vocab // tp)
            pieces = [_shard(key, (rows * tp, 100), (r * rows, 0), (rows, 100), 0) for r in range(tp)]
            got = _assemble(pieces, **init)[key]
            assert torch.equal(got[:vocab], whole) and not got[vocab:].any(), (vocab, tp)
    other_seed = _assemble(stacked[:1], **{**INIT, "seed": 8})["decoder.layers.mlp.experts.linear_fc1.weight"]
    assert not torch.equal(other_seed[0, 0], w[0, 0])


def test_a_rank_draws_its_share_not_the_stack(draws):
    """TP=4 of a tile-aligned [L, 1024, 512] key: each rank draws exactly its slice, one
    tile at a time (the old code drew L x the whole stack: 4 * 4 * 1024 * 512 per rank)."""
    L, R, C = 4, 1024, 512
    for rank in range(4):
        draws.clear()
        shards = [_shard("decoder.layers.self_attention.linear_qkv.weight", (L, R, C), (l, rank * R // 4, 0),
                         (R // 4, C), 1) for l in range(L)]
        _assemble(shards, **INIT)
        assert sum(draws) == L * R * C // 4
        assert max(draws) == INIT_TILE * INIT_TILE


def _chunks(overrides: list[str]):
    cfg = load_config(None, ["train.seed=3", *overrides])
    chunks, _ = build_model_chunks(cfg)
    return cfg, chunks


@pytest.mark.usefixtures("single_rank_megatron")
def test_model_init_is_per_layer_and_draws_at_most_one_layer(draws):
    """qwen3vl-moe-tiny (stacked layers, experts, swiglu halves, the vocabulary,
    the ViT's 5-D patch conv): no draw exceeds one layer's (expert's) full tensor, and the
    drawn elements add up to about the model's matrices (each drawn once, not once per layer
    as before: that was >= 4x here). The excess is the experts' swiglu halves, 32 rows each
    of a 64-row tile: each half draws the whole tile."""
    cfg, chunks = _chunks(["model.preset=qwen3vl-moe-tiny"])
    shards = list(iter_shards(chunks))
    layer_numel = max(math.prod(s.global_shape[s.prepend_axis_num:]) for s in shards)
    matrices = sum(s.data.numel() for s in shards if s.data.dim() >= 2)
    assert max(draws) <= layer_numel
    assert matrices <= sum(draws) < 1.5 * matrices
    full = full_tensors.gather_full_tensors(chunks)
    qkv = full["language.decoder.layers.self_attention.linear_qkv.weight"]
    assert not torch.equal(qkv[0], qkv[1])
    assert not full["vision.merger.linear_fc1.bias"].any()  # biases zero
    norm = full["language.decoder.layers.self_attention.q_layernorm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))  # norm weights as built
    lm = cfg.model.language
    fc2 = full["language.decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    assert 0.8 < fc2.std() / (cfg.model.init_std / math.sqrt(2 * lm.num_layers)) < 1.2  # scaled init


@pytest.mark.usefixtures("single_rank_megatron")
def test_a_layer_does_not_depend_on_the_depth_or_the_pipeline_split():
    """Layer i is the same in a 4- and a 2-layer model (up to the depth-scaled init of the
    output projections), and in any PP/TP-like re-cut of the model's own shard descriptions."""
    cfg, chunks = _chunks(["model.preset=qwen3-moe-tiny"])
    deep = full_tensors.gather_full_tensors(chunks)
    _, chunks2 = _chunks(["model.preset=qwen3-moe-tiny", "model.language.num_layers=2"])
    shallow = full_tensors.gather_full_tensors(chunks2)
    assert set(deep) == set(shallow)
    for key, t in shallow.items():
        if ".layers." not in key:
            assert torch.equal(t, deep[key]), key
        elif key.endswith(full_tensors._SCALED_INIT_KEYS):  # std / sqrt(2 * num_layers)
            torch.testing.assert_close(t, deep[key][:2] * math.sqrt(2), rtol=1e-6, atol=0)
        else:
            assert torch.equal(t, deep[key][:2]), key
    # PP=2 x TP-like cuts of the real shards: stage 1 holds layers 2-3, each matrix in pieces
    init = dict(seed=cfg.train.seed, std=cfg.model.init_std, num_layers=4, vocab_size=cfg.model.language.vocab_size)
    pieces = []
    for sh in iter_shards(chunks):
        if sh.data.dim() < 2 or (sh.prepend_axis_num and sh.global_offset[0] < 2):
            continue
        pieces += _pieces(_shard(sh.key, sh.global_shape, sh.global_offset, sh.data.shape, sh.prepend_axis_num),
                          dim=sh.data.dim() - 1 if "linear_fc2" in sh.key else 0, parts=3)
    got = _assemble(pieces, **init)
    for key, t in got.items():
        written = ~t.isnan()
        assert written.any() and torch.equal(t[written], deep[key][written]), key
