"""megatron-core ``TransformerConfig`` of megavlm's transformers, from the typed config.

The decoder's config is built here; the ViTs build theirs next to their modules
(``models/vision``) from the same precision and kernel fields, so a GPU run turns the same
fused kernels on for every transformer of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.schema import ModelConfig, ParallelConfig, RecomputeConfig
from megavlm.platform import device
from megavlm.platform.distributed import megatron_parallel_sizes


def precision_and_kernels(dtype: torch.dtype, *, use_te: bool) -> dict:
    """TransformerConfig fields shared by every megavlm transformer: precision, and the fused
    kernels, which exist only with CUDA (and TE/apex)."""
    return dict(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not device.has_cuda(),
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        apply_rope_fusion=False,
        masked_softmax_fusion=use_te,
        # megatron's local linear layers raise without apex's fused wgrad kernel; TE's have
        # their own. Turned on only where the kernel the chosen layers call exists.
        gradient_accumulation_fusion=device.has_wgrad_accumulation_fusion(use_te=use_te),
        persist_layer_norm=use_te,
    )


def recompute_fields(recompute: RecomputeConfig | None) -> dict:
    """megatron-core's activation-recompute fields for ``train.recompute``."""
    if recompute is None or recompute.granularity is None:
        return {}
    if recompute.granularity == "selective":
        return dict(recompute_granularity="selective")
    return dict(
        recompute_granularity="full", recompute_method=recompute.method,
        recompute_num_layers=recompute.num_layers,
    )


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, *, dtype: torch.dtype, use_te: bool,
    recompute: RecomputeConfig | None = None, cuda_graph: str | None = None,
    cuda_graph_scope: list[str] | None = None,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for a Qwen3 decoder under the given layout."""
    lm = model.language
    moe = lm.moe
    fp8 = model.fp8
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.head_dim,
        layernorm_epsilon=lm.norm_eps,
        normalization="RMSNorm",
        qk_layernorm=lm.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        # parallel layout
        **megatron_parallel_sizes(parallel),
        sequence_parallel=parallel.sequence_parallel,
        cp_comm_type=parallel.cp_comm_type if parallel.cp > 1 else None,
        **recompute_fields(recompute),
        # CUDA graphs of the decoder layers (train.cuda_graph): megatron's schedules capture
        # them after cuda_graph_warmup_steps steps; [] is the whole layer
        cuda_graph_impl=cuda_graph or "none",
        cuda_graph_scope=list(cuda_graph_scope or []),
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
        # TE userbuffers (initialize_tp_comm_overlap) for the decoder's TP communication
        tp_comm_overlap=parallel.tp_comm_overlap,
        # The loss is a token sum; megatron divides by the global token count (all DP ranks
        # and micro-batches), which makes the result independent of the layout.
        calculate_per_token_loss=True,
        # gloo mismatches batched p2p messages when the previous and next pipeline stage are
        # the same rank (PP=2 with virtual stages); NCCL batches them correctly.
        batch_p2p_comm=device.distributed_backend() == "nccl",
        **precision_and_kernels(dtype, use_te=use_te),
        fp8=fp8.format,
        fp8_recipe=fp8.recipe,
        fp8_amax_history_len=fp8.amax_history_len,
        fp8_amax_compute_algo=fp8.amax_compute_algo,
        fp8_param=fp8.param,
        # MoE (Qwen3-MoE: softmax router, top-k then renormalize, load-balancing aux loss)
        num_moe_experts=moe.num_experts if moe else None,
        moe_router_topk=moe.topk if moe else 2,
        moe_ffn_hidden_size=moe.ffn_hidden_size if moe else None,
        moe_aux_loss_coeff=moe.aux_loss_coeff if moe else 0.0,
        moe_router_load_balancing_type="aux_loss" if moe else "none",
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32" if moe else None,
        moe_token_dispatcher_type=moe.dispatcher if moe else "allgather",
        moe_grouped_gemm=moe.grouped_gemm if moe else False,
        moe_layer_freq=moe.layer_freq if moe else 1,
        moe_permute_fusion=False,
    )


def use_graph_safe_rng() -> None:
    """Megatron's RNG trackers as Transformer Engine's graph-safe ones, which its CUDA graph
    capture requires (Megatron-LM's ``--te-rng-tracker``). Same seeds: ``torch.initial_seed()``
    is the stage seed ``megavlm.platform.distributed.seed_everything`` set."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(torch.initial_seed(), te_rng_tracker=True)


def initialize_tp_comm_overlap(model: ModelConfig, parallel: ParallelConfig, *, seq_length: int,
                               micro_batch_size: int, dtype: torch.dtype) -> None:
    """Transformer Engine's userbuffers for ``parallel.tp_comm_overlap``, before the layers are
    built (what Megatron-LM's ``_initialize_tp_communicators`` does): one buffer of the
    decoder's sequence-parallel activations, ``[seq * micro_batch / cp, hidden]``."""
    from transformer_engine.pytorch import module as te_module

    te_module.base.initialize_ub(
        shape=[seq_length * micro_batch_size // parallel.cp, model.language.hidden_size],
        tp_size=parallel.tp,
        use_fp8=model.fp8.format is not None,
        dtype=dtype,
    )

