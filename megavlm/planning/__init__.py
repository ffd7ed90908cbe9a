"""Parallelism planner: memory, FLOPs and step time of megavlm layouts on a GPU cluster.

``tools/plan_parallelism.py`` is the command line. Library entry points:

* ``estimate(model, Layout(...), gpus=, gpu=, seq_length=)`` -> ``Plan`` (per-stage
  memory, step-time breakdown, MFU) for one layout;
* ``rank_layouts(model, gpus=, gpu=, seq_length=)`` -> valid layouts that fit, fastest first;
* ``check_layout`` (megavlm's own validation), ``rank_params`` / ``grad_buffer`` (exact
  per-rank parameters and DDP buffers), ``stage_memory`` / ``layer_activation_bytes``,
  ``training_flops_per_sequence``, ``get_gpu`` / ``get_model``.
"""

from megavlm.planning.flops import Efficiency, training_flops_per_sequence
from megavlm.planning.hardware import GPU, GPUS, get_gpu, gpu_names
from megavlm.planning.layout import Layout, build_config, check_layout
from megavlm.planning.memory import (
    ActivationInputs,
    StageMemory,
    chunk_activation_bytes,
    layer_activation_bytes,
    peak_inflight,
    stage_memory,
)
from megavlm.planning.models import PlanModel, VisionSpec, get_model, model_names
from megavlm.planning.params import GradBuffer, ParamTensor, RankParams, grad_buffer, rank_params, total_params
from megavlm.planning.planner import (
    LayoutError,
    Plan,
    Ranking,
    assumptions,
    default_global_batch_size,
    estimate,
    format_breakdown,
    format_table,
    language_config,
    rank_layouts,
)

__all__ = [
    "ActivationInputs",
    "Efficiency",
    "GPU",
    "GPUS",
    "GradBuffer",
    "Layout",
    "LayoutError",
    "ParamTensor",
    "Plan",
    "PlanModel",
    "RankParams",
    "Ranking",
    "StageMemory",
    "VisionSpec",
    "assumptions",
    "build_config",
    "check_layout",
    "chunk_activation_bytes",
    "default_global_batch_size",
    "estimate",
    "format_breakdown",
    "format_table",
    "get_gpu",
    "get_model",
    "gpu_names",
    "grad_buffer",
    "language_config",
    "layer_activation_bytes",
    "model_names",
    "peak_inflight",
    "rank_layouts",
    "rank_params",
    "stage_memory",
    "total_params",
    "training_flops_per_sequence",
]
