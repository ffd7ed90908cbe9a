"""Loss normalization over the global batch: per token, per sample, or square root.

With N_i the supervised tokens of sample i, each token of sample i gets weight
``per_token: 1``, ``per_sample: 1 / N_i`` or ``sqrt: 1 / sqrt(N_i)`` and the loss is
``sum_t w_t l_t / sum_t w_t`` over the whole global batch (all DP ranks, micro-batches and
packed samples; REFERENCE 6). megatron-core's per-token mode divides the summed gradients
by the global count of supervised tokens T, so we hand it weights rescaled by T / W (W the
global weight sum): then its division gives exactly ``sum w l / W``, for any layout and any
number of micro-batches. ``per_token`` needs no rescaling and no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megavlm.data.batch import Batch

MODES = ("per_token", "per_sample", "sqrt")


def sample_weights(loss_mask: torch.Tensor, sample_ids: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Unnormalized per-token weights ``[b, s]`` (zero where the loss mask is zero)."""
    mask = loss_mask.float()
    if mode == "per_token":
        return mask
    if sample_ids is None:  # one sample per row
        sample_ids = torch.zeros_like(mask, dtype=torch.long)
    # A sample is identified by (row, id within the row).
    keys = torch.arange(mask.shape[0], device=mask.device)[:, None] * (int(sample_ids.max()) + 2) + sample_ids + 1
    counts = torch.zeros(int(keys.max()) + 1, device=mask.device).index_add_(0, keys.flatten(), mask.flatten())
    n = counts[keys].clamp(min=1.0)  # supervised tokens of each token's sample
    per_sample = {"per_sample": 1.0 / n, "sqrt": n.rsqrt()}
    if mode not in per_sample:
        raise ValueError(f"train.loss_normalization: {mode!r} is not one of {', '.join(MODES)}")
    return mask * per_sample[mode]


def weight_micro_batches(batches: list[Batch], mode: str, dp_group) -> list[Batch]:
    """Attach loss weights to one step's micro-batches of this DP rank (see module doc)."""
    if mode == "per_token":
        return batches
    weights = [sample_weights(b.loss_mask, b.sample_ids, mode) for b in batches]
    totals = torch.stack([
        sum(b.loss_mask.float().sum() for b in batches),  # T (supervised tokens)
        sum(w.sum() for w in weights),  # W
    ]).double()
    dist.all_reduce(totals, group=dp_group)
    scale = float(totals[0] / totals[1].clamp(min=1e-12))
    return [b.with_loss_weights(w * scale) for b, w in zip(batches, weights)]
