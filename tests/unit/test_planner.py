"""The parallelism planner: formulas on hand-computed cases, validity from megavlm's own
rules, ranking, and the command line (no processes; the comparison with real models is
tests/parallel/test_planner_memory.py)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import megavlm.planning.layout as layout_module
from megavlm.config import load_config, validate
from megavlm.planning import (
    ActivationInputs,
    Layout,
    LayoutError,
    VisionSpec,
    check_layout,
    chunk_activation_bytes,
    estimate,
    get_gpu,
    get_model,
    grad_buffer,
    language_config,
    layer_activation_bytes,
    peak_inflight,
    rank_layouts,
    rank_params,
    total_params,
    training_flops_per_sequence,
)
from megavlm.planning.flops import layer_forward_flops
from megavlm.planning.hardware import GiB
from megavlm.planning.params import ParamTensor, chunk_items, chunk_params, padded_vocab, vision_params

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plan_parallelism.py"


def _lm(name: str, *overrides: str):
    return load_config(None, [f"model.preset={name}", *overrides]).model.language


# ------------------------------------------------------------------------- hardware, models


def test_gpu_table_and_unknown_name():
    h100 = get_gpu("h100-80gb")
    assert (h100.memory_bytes, h100.bf16_flops, h100.fp8_flops) == (80 * GiB, 989e12, 1979e12)
    assert (h100.hbm_bytes_per_s, h100.nvlink_bytes_per_s, h100.ib_bytes_per_s) == (3.35e12, 450e9, 50e9)
    assert get_gpu("h800-80gb").nvlink_bytes_per_s == 200e9
    assert get_gpu("h800-80gb").bf16_flops == h100.bf16_flops
    assert get_gpu("h200").hbm_bytes_per_s == 4.8e12 and get_gpu("a100-80gb").bf16_flops == 312e12
    with pytest.raises(ValueError, match="known: a100-80gb, h100-80gb, h200, h800-80gb"):
        get_gpu("b200")


def test_models_and_unknown_name():
    assert get_model("qwen3-8b").vision is None and not get_model("qwen3-8b").planner_only
    vlm = get_model("qwen3vl-8b")
    assert not vlm.planner_only and vlm.preset == "qwen3vl-8b" and vlm.vision.num_layers == 27
    assert get_model("qwen3vl-2b").vision.deepstack_mergers == 3
    assert get_model("step3vl-10b").vision is None and "not modelled" in get_model("step3vl-10b").note
    with pytest.raises(ValueError, match="known: .*qwen3-tiny.*qwen3vl-8b"):
        get_model("llama-7b")


# ------------------------------------------------------------------------- parameters


def test_qwen3_8b_total_parameters_by_hand():
    h, f, V, L = 4096, 12288, 151936, 36
    per_layer = 2 * h + h * 32 * 128 + (32 + 2 * 8) * 128 * h + 2 * 128 + 3 * h * f
    assert total_params(_lm("qwen3-8b")) == 2 * V * h + L * per_layer + h == 8_190_735_360


def test_tied_embeddings_counted_once_and_copied_on_the_last_stage():
    lm = _lm("qwen3-0.6b")
    h, V = 1024, 151936
    one = rank_params(lm, Layout(), 0, gpus=1)
    two = [rank_params(lm, Layout(pp=2), r, gpus=2) for r in (0, 1)]
    assert one.param_count == total_params(lm)
    assert two[0].param_count + two[1].param_count == one.param_count + V * h
    names = [p.name for p in chunk_params(lm, Layout(pp=2), 1)]
    assert names[-1] == "output_layer.weight" and "output_layer.weight" not in [
        p.name for p in chunk_params(lm, Layout(), 0)
    ]


def test_tp_pp_shards_of_qwen3_tiny_by_hand():
    """qwen3-tiny (h 64, 4 heads / 2 groups x 16, ffn 128, vocab 256), tp=2 pp=2, stage 0."""
    lm = _lm("qwen3-tiny")
    layer = 64 + 64 * 32 + (4 + 2 * 2) * 16 // 2 * 64 + 2 * 16 + 64 + 2 * 128 // 2 * 64 + 64 * 128 // 2
    assert rank_params(lm, Layout(tp=2, pp=2), 0, gpus=4).param_count == 256 // 2 * 64 + 2 * layer == 45376
    shapes = {p.name: p.shape for p in chunk_params(lm, Layout(tp=2, pp=2), 0)}
    assert shapes["decoder.layers.1.self_attention.linear_qkv.weight"] == (64, 64)
    assert shapes["decoder.layers.1.mlp.linear_fc2.weight"] == (64, 64)
    assert "decoder.layers.2.input_layernorm.weight" not in shapes  # layers 2, 3 on stage 1


def test_experts_split_over_ep_and_etp_router_replicated():
    lm = _lm("qwen3-moe-tiny")  # 4 experts, ffn 32
    params = chunk_params(lm, Layout(tp=2, ep=2, etp=1), 0)
    experts = [p for p in params if p.expert and ".layers.0." in p.name]
    assert len(experts) == 2 * 2 and experts[0].shape == (64, 64) and experts[1].shape == (64, 32)
    router = next(p for p in params if p.name.endswith("layers.0.mlp.router.weight"))
    assert router.shape == (4, 64) and not router.expert
    etp2 = [p for p in chunk_params(lm, Layout(tp=2, ep=2), 0) if p.expert]
    assert etp2[0].shape == (32, 64)


def test_interleaved_chunks_hold_megatrons_layers():
    lm = _lm("qwen3-tiny")

    def layers(r: int, v: int) -> list[str]:
        names = [p.name for p in chunk_params(lm, Layout(pp=2, vpp=2), r, v)]
        return sorted({n.split(".")[2] for n in names if n.startswith("decoder.layers")})

    assert [layers(0, 0), layers(1, 0), layers(0, 1), layers(1, 1)] == [["0"], ["1"], ["2"], ["3"]]


def test_vocab_padding_option():
    assert padded_vocab(151936, 8) == 151936  # megavlm: unpadded
    assert padded_vocab(151936, 2, 128) == 152064  # Megatron-LM: multiple of 128 * tp


def test_vision_parameters_by_hand():
    v = VisionSpec(
        num_layers=1,
        hidden_size=8,
        ffn_hidden_size=16,
        num_heads=2,
        out_hidden_size=4,
        patch_size=2,
        temporal_patch_size=1,
        in_channels=1,
        num_position_embeddings=3,
        deepstack_mergers=1,
    )
    patch = 8 * 4 + 8 + 3 * 8
    block = 4 * 8 + (24 * 8 + 24) + (8 * 8 + 8) + (16 * 8 + 16) + (8 * 16 + 8)
    merger = 2 * 8 + (32 * 32 + 32) + (4 * 32 + 4)
    deepstack = 2 * 32 + (32 * 32 + 32) + (4 * 32 + 4)
    assert sum(p.numel for p in vision_params(v, tp=1)) == patch + block + merger + deepstack
    qwen3vl_8b = get_model("qwen3vl-8b")
    vision_8b = total_params(language_config(qwen3vl_8b), qwen3vl_8b.vision) - total_params(_lm("qwen3-8b"))
    assert 0.5e9 < vision_8b < 0.65e9  # Qwen3-VL-8B's ViT + mergers: ~0.58B


@pytest.mark.usefixtures("single_rank_megatron")
def test_vision_count_equals_the_built_vision_model():
    from megavlm.models.build import build_model_chunks

    tiny = get_model("qwen3vl-tiny")
    (chunk,), _ = build_model_chunks(load_config(None, ["model.preset=qwen3vl-tiny"]))
    built = sum(p.numel() for p in chunk.vision.parameters())
    assert sum(p.numel for p in vision_params(tiny.vision, tp=1)) == built


# ------------------------------------------------------------------------- DDP buffers


def test_grad_buffer_padding_by_hand():
    """Reverse order; distributed optimizer: starts at multiples of 64, end at lcm(dp, 128)."""
    a, b = ParamTensor("a", (100,)), ParamTensor("b", (10,))
    buf = grad_buffer([a, b], group_size=4, distributed_optimizer=True)
    assert buf.param_ranges == [(0, 10, 0), (64, 164, 0)] and buf.numel == 256
    assert [buf.owned_elements(r) for r in range(4)] == [10, 64, 36, 0]
    plain = grad_buffer([a, b], group_size=4, distributed_optimizer=False)
    assert plain.numel == 110 and plain.owned_elements(3) == 110


def test_shared_embedding_gets_its_own_bucket():
    e, x = ParamTensor("emb", (100,), shared_embedding=True), ParamTensor("x", (10,))
    buf = grad_buffer([e, x], group_size=2, distributed_optimizer=True)
    assert buf.buckets == [(0, 128), (128, 256)] and buf.param_ranges == [(0, 10, 0), (128, 228, 1)]


def test_merged_items_lay_out_like_the_parameters():
    """The fast path (padding-free runs merged) equals the parameter-by-parameter layout."""
    for preset, layout in [
        ("qwen3-tiny", Layout(tp=2, pp=2)),
        ("qwen3-moe-tiny", Layout(ep=2)),
        ("qwen3-0.6b", Layout(pp=2)),
        ("qwen3-tiny", Layout(pp=2, vpp=2)),
    ]:
        lm = _lm(preset, "model.language.tie_embeddings=true")
        for r in range(layout.pp):
            for v in range(layout.vpp):
                params = chunk_params(lm, layout, r, v)
                dense, expert = chunk_items(lm, layout, r, v)
                for group in (1, 3, 4):
                    slow = grad_buffer([p for p in params if not p.expert], group, True)
                    fast = grad_buffer(dense, group, True)
                    assert (slow.numel, slow.buckets) == (fast.numel, fast.buckets)
                    assert [slow.owned_elements(k) for k in range(group)] == [
                        fast.owned_elements(k) for k in range(group)
                    ]
                assert sum(n for n, _ in expert) == sum(p.numel for p in params if p.expert)


# ------------------------------------------------------------------------- activations


def test_local_activation_formula_matches_the_measured_tiny_model():
    """qwen3-tiny, s=64, b=2, fp32, one rank: 3,337,344 bytes saved for backward, as measured
    with saved_tensors_hooks (tests/parallel/test_planner_memory.py measures it again)."""
    lm = _lm("qwen3-tiny")
    act = ActivationInputs(seq_length=64, micro_batch_size=2, dtype="fp32", backend="local")
    # per token and layer: 6h + 2 + 4q + q' + 4k + 2nq + nkv + 5f elements (fp32) + lse 4*nq bytes
    h, q, k, f, nq, nkv = 64, 64, 32, 128, 4, 2
    per_token = 4 * (6 * h + 2 + 5 * q + 4 * k + nq + nkv + 5 * f) + 4 * nq
    rope = 4 * 64 * 16 * 4
    assert layer_activation_bytes(lm, Layout(), act, moe=False) == 128 * per_token + rope
    assert chunk_activation_bytes(lm, Layout(), act, 0, 0) == 3_337_344


def test_te_activation_formula_by_hand():
    """Qwen3-8B, one token, bf16, tp=1: the 'te' per-layer terms of the memory docstring."""
    lm = _lm("qwen3-8b")
    act = ActivationInputs(seq_length=1, micro_batch_size=1, dtype="bf16", backend="te")
    h, q, k, f, nq, nkv = 4096, 4096, 1024, 12288, 32, 8
    attn = 2 * (2 * h + 3 * q + q + 3 * k) + 4 * (1 + 2 * nq + nkv)
    mlp = 2 * (2 * h + 3 * f) + 4
    assert layer_activation_bytes(lm, Layout(), act, moe=False) == attn + mlp + 4 * 128 * 2


def test_sequence_parallel_and_recompute():
    lm = _lm("qwen3-8b")
    act = ActivationInputs(seq_length=4096, micro_batch_size=1, dtype="bf16", backend="te")
    full = layer_activation_bytes(lm, Layout(tp=4, recompute="full"), act, moe=False)
    assert full == 4096 * 4096 / 4 * 2  # the layer input only, sharded by SP
    sp = layer_activation_bytes(lm, Layout(tp=4), act, moe=False)
    no_sp = layer_activation_bytes(lm, Layout(tp=4, sequence_parallel=False), act, moe=False)
    # SP shards the four h-sized tensors (2 norm inputs, 2 norm outputs) and the two fp32 rstd
    assert no_sp - sp == pytest.approx(4096 * (2 * 4 * 4096 * 3 / 4 + 4 * 2 * 3 / 4))
    assert layer_activation_bytes(lm, Layout(recompute="selective"), act, moe=False) < layer_activation_bytes(
        lm, Layout(), act, moe=False
    )


def test_inflight_microbatches_follow_megatrons_schedules():
    assert peak_inflight(4, 1, 8, 0, [1.0])[1] == [4]  # 1F1B: pp on the first stage
    assert peak_inflight(4, 1, 8, 3, [1.0])[1] == [1]
    assert peak_inflight(4, 1, 2, 0, [1.0])[1] == [2]  # fewer micro-batches than stages
    assert peak_inflight(1, 1, 8, 0, [1.0])[1] == [1]
    for pp, vpp, m in [(2, 2, 4), (4, 2, 8), (4, 3, 16), (8, 4, 64)]:
        _, counts = peak_inflight(pp, vpp, m, 0, [1.0] * vpp)
        assert sum(counts) == pp * vpp + pp - 1  # megatron's bound, in chunk micro-batches
    assert peak_inflight(2, 2, 2, 0, [1.0, 1.0])[1] == [2, 2]  # everything in warmup


# ------------------------------------------------------------------------- FLOPs


def test_layer_flops_by_hand():
    lm = _lm("qwen3-tiny")
    s = 8
    f = layer_forward_flops(lm, s, moe=False)
    assert f.linear == 2 * s * 64 * (4 + 4) * 16 + 2 * s * 64 * 64 + 6 * s * 64 * 128
    assert f.core == 2 * s * s * 64  # 2*2*s^2*nq*d, halved for the causal mask
    moe = layer_forward_flops(_lm("qwen3-moe-tiny"), s, moe=True)
    assert moe.linear - (2 * s * 64 * 8 * 16 + 2 * s * 64 * 64) == 2 * s * 64 * 4 + 2 * 6 * s * 64 * 32


def test_training_flops_multipliers_and_6nd():
    lm = _lm("qwen3-8b")
    model, hw = training_flops_per_sequence(lm, 4096)
    assert hw == model
    _, full = training_flops_per_sequence(lm, 4096, recompute="full")
    _, sel = training_flops_per_sequence(lm, 4096, recompute="selective")
    assert model < sel < full < model * 4 / 3
    # 6 * params * tokens (params without the input embedding) plus attention
    n = total_params(lm) - 151936 * 4096
    assert 1.0 < model / (6 * n * 4096) < 1.15


def test_estimate_reports_consistent_breakdown():
    plan = estimate("qwen3-8b", Layout(tp=4, pp=2), gpus=64, gpu="h100-80gb", seq_length=8192, global_batch_size=512)
    t = plan.time
    assert t.num_microbatches == 64 and len(plan.stages) == 2
    assert t.step_time == pytest.approx(t.pipeline + t.dp_comm + t.optimizer)
    assert t.bubble == pytest.approx(t.slowest.total / 64 * 64 * (2 - 1))
    assert 0.2 < t.mfu < 0.7 and plan.fits
    assert plan.stages[0].inflight == [2] and plan.stages[1].inflight == [1]
    assert t.model_flops == pytest.approx(training_flops_per_sequence(language_config(plan.model), 8192)[0] * 512)


# ------------------------------------------------------------------------- validity, ranking


def test_validity_is_megavlms_own():
    tiny = get_model("qwen3-tiny")
    kw = dict(gpus=8, seq_length=128, global_batch_size=8)
    assert check_layout(tiny, Layout(tp=2, pp=2), **kw) == []
    errors = check_layout(tiny, Layout(tp=4), **kw)
    assert any("num_query_groups (2) must be a multiple of parallel.tp (4)" in e for e in errors)
    assert any(
        "must be a multiple of train.micro_batch_size x DP" in e
        for e in check_layout(tiny, Layout(micro_batch_size=4), **kw)
    )
    # CP: validated with cp folded away, plus the planner's own sequence rule
    assert check_layout(tiny, Layout(cp=2), **kw) == []
    assert any(
        "multiple of 2 x cp" in e for e in check_layout(tiny, Layout(cp=4), gpus=8, seq_length=4, global_batch_size=8)
    )
    # megatron's interleaved schedule: micro-batches a multiple of pp (a megavlm rule)
    assert any(
        "multiple of parallel.pp" in e
        for e in check_layout(tiny, Layout(pp=2, vpp=2), gpus=2, seq_length=128, global_batch_size=3)
    )


@pytest.mark.parametrize(
    "layout",
    [
        Layout(),
        Layout(tp=2, pp=2, vpp=2, micro_batch_size=2),
        Layout(tp=2, ep=4, etp=1),
        Layout(pp=4, distributed_optimizer=False, sequence_parallel=False),
    ],
)
def test_fast_validation_config_equals_the_parsed_one(layout):
    """Ranking builds configs without re-parsing the model keys; they equal load_config's."""
    model = get_model("qwen3vl-8b") if layout.ep == 1 else get_model("qwen3-30b-a3b")
    kw = dict(seq_length=8192, global_batch_size=64)
    assert layout_module._fast_config(model, layout, **kw) == layout_module.build_config(model, layout, **kw)


def test_ranking_returns_only_valid_fitting_layouts_fastest_first(monkeypatch):
    calls = []
    real = layout_module.validate
    monkeypatch.setattr(layout_module, "validate", lambda cfg, world: (calls.append(world), real(cfg, world))[1])
    model = get_model("qwen3-8b")
    ranking = rank_layouts(model, gpus=16, gpu="h100-80gb", seq_length=4096, global_batch_size=48, top=None)
    assert calls  # megavlm.config.validate decided validity
    assert ranking.plans and len(ranking.plans) + sum(ranking.equivalents) == ranking.fitting
    assert ranking.fitting <= ranking.valid < ranking.considered
    times = [p.time.step_time for p in ranking.plans]
    assert times == sorted(times) and len(set(times)) == len(times)  # equal times collapsed
    for plan in ranking.plans:
        L = plan.layout
        assert plan.fits and plan.peak_memory <= 0.9 * 80 * GiB
        assert check_layout(model, L, gpus=16, seq_length=4096, global_batch_size=48) == []
        if L.cp == 1:  # nothing folded: megavlm's validate accepts the config as is
            cfg = load_config(
                None, [*model.config_overrides(), *L.overrides(), "data.seq_length=4096", "train.global_batch_size=48"]
            )
            validate(cfg, 16)
    fixed = rank_layouts(model, gpus=16, gpu="h100-80gb", seq_length=4096, global_batch_size=64, fixed={"tp": 2})
    assert fixed.plans and all(p.layout.tp == 2 for p in fixed.plans)


def test_nothing_fits_is_reported():
    ranking = rank_layouts("qwen3-30b-a3b", gpus=1, gpu="h100-80gb", seq_length=4096, global_batch_size=1)
    assert ranking.plans == [] and ranking.valid > 0


def test_estimate_rejects_invalid_layouts_with_megavlms_message():
    with pytest.raises(LayoutError, match=r"model.language.num_layers \(4\) must be a multiple of parallel.pp"):
        estimate("qwen3-tiny", Layout(pp=3), gpus=3, gpu="h100-80gb", seq_length=128, global_batch_size=3)


# ------------------------------------------------------------------------- command line


def _tool():
    spec = importlib.util.spec_from_file_location("plan_parallelism", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_ranks_layouts(capsys):
    rc = _tool().main(
        ["--model", "qwen3-8b", "--gpus", "16", "--gpu", "h100-80gb", "--seq-length", "4096", "--top", "3"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "qwen3-8b on 16 x h100-80gb, seq 4,096" in out and "layouts considered" in out
    ranks = re.findall(r"^\s*(\d+)\s+tp\d", out, re.M)
    assert ranks == ["1", "2", "3"]
    assert "assumptions:" in out and "global batch 1024 sequences" in out


def test_cli_breakdown_of_one_layout(capsys):
    rc = _tool().main(
        [
            "--model",
            "qwen3vl-8b",
            "--gpus",
            "64",
            "--seq-length",
            "32768",
            "--tp",
            "2",
            "--pp",
            "2",
            "--cp",
            "4",
            "--global-batch-size",
            "64",
            "--recompute",
            "selective",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "layout tp2 pp2 cp4: dp 4" in out and "recompute selective" in out
    assert "pp0" in out and "pp1" in out and "MFU" in out and "bubble" in out
    assert "needs TE" not in out and "not in megavlm" not in out and "vision tower: 27x1152 ViT" in out


def test_cli_language_override(capsys):
    tool = _tool()
    args = ["--model", "qwen3-8b", "--gpus", "64", "--seq-length", "65536", "--top", "1"]
    assert tool.main(args) == 1
    assert "exceeds model.language.max_position_embeddings (40960)" in capsys.readouterr().out
    assert tool.main([*args, "--language", "max_position_embeddings=65536"]) == 0
    assert tool.main([*args, "--language", "max_pos=1"]) == 2
    assert "unknown config key 'model.language.max_pos'" in capsys.readouterr().err


def test_cli_errors(capsys):
    tool = _tool()
    assert tool.main(["--model", "qwen3-tiny", "--gpus", "4", "--seq-length", "128", "--tp", "4", "--pp", "1"]) == 2
    assert "num_query_groups (2) must be a multiple of parallel.tp (4)" in capsys.readouterr().err
    assert tool.main(["--model", "qwen3-8b", "--gpus", "8", "--gpu", "v100", "--seq-length", "128"]) == 2
    assert "known: a100-80gb, h100-80gb, h200, h800-80gb" in capsys.readouterr().err
