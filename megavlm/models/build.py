"""Build this rank's model chunks from the config: the one place a run's model is made.

Training, inference, conversion and RL all call ``build_model_chunks``; the layout comes
from megatron's parallel state (initialized before), so the same call gives any rank of
any TP/PP/VPP/EP layout its part. Wrapping for data parallelism is training's business.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.schema import Config
from megavlm.models.full_tensors import initialize_layout_invariant
from megavlm.models.transformer_config import initialize_tp_comm_overlap, transformer_config
from megavlm.models.vlm import VLMModel
from megavlm.platform import device


def num_model_chunks(cfg: Config) -> int:
    return cfg.parallel.vpp if cfg.parallel.vpp and cfg.parallel.vpp > 1 else 1


def build_model_chunks(cfg: Config) -> tuple[list[torch.nn.Module], TransformerConfig]:
    """Unwrapped model chunks (one per virtual pipeline stage) on this rank's device."""
    use_te = device.use_transformer_engine(cfg.model.transformer_impl)
    dtype = device.default_dtype(cfg.train.precision)
    tconfig = transformer_config(cfg.model, cfg.parallel, dtype=dtype, use_te=use_te, recompute=cfg.train.recompute,
                                 cuda_graph=cfg.train.cuda_graph, cuda_graph_scope=cfg.train.cuda_graph_scope)
    if cfg.parallel.tp_comm_overlap:
        initialize_tp_comm_overlap(cfg.model, cfg.parallel, seq_length=cfg.data.seq_length,
                                   micro_batch_size=cfg.train.micro_batch_size, dtype=dtype)
    vpp = num_model_chunks(cfg)
    chunks = [
        VLMModel(cfg.model, cfg.parallel, tconfig, use_te=use_te, vp_stage=i if vpp > 1 else None)
        for i in range(vpp)
    ]
    if cfg.model.init == "layout_invariant":
        lm = cfg.model.language
        initialize_layout_invariant(
            chunks, seed=cfg.train.seed, std=cfg.model.init_std, num_layers=lm.num_layers,
            vocab_size=lm.vocab_size,
        )
    return [chunk.to(device.device()) for chunk in chunks], tconfig
