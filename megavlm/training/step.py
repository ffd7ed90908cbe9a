"""What megatron's pipeline schedules call for one micro-batch: forward and the loss."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megavlm.data.batch import Batch
from megavlm.platform import device


def token_loss_sum(loss_mask: torch.Tensor, loss_weights: torch.Tensor | None, output_tensor: torch.Tensor):
    """Weighted sum of token losses and the supervised-token count (megatron's per-token contract).

    megatron adds the counts over micro-batches and DP ranks and divides the gradients by
    the total, so the loss is normalized over the whole global batch whatever the layout;
    ``loss_weights`` (training.losses) are already scaled for that division.
    """
    losses = output_tensor.float()  # [b, s] per-token cross entropy
    mask = loss_mask.float()
    weights = mask if loss_weights is None else loss_weights.float()
    loss_sum = (losses * weights).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def packed_seq_params(cu_seqlens: torch.Tensor, target: torch.device | None = None) -> PackedSeqParams:
    """megatron's thd parameters; the longest segment is read where ``cu_seqlens`` lives (the
    CPU side of the data path) before the boundaries are copied to ``target``."""
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if target is not None:
        cu_seqlens = cu_seqlens.to(target, non_blocking=True)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len, max_seqlen_kv=max_len,
    )


# Small host-side tensors that only shape the computation: kept on the CPU so that reading
# them (lengths, grid sizes) never synchronizes with the device in the forward.
HOST_FIELDS = ("image_grid_thw", "video_grid_thw")


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
    host = next(data_iterator)
    batch = host.to(device.device())
    packed = None if host.cu_seqlens is None else packed_seq_params(host.cu_seqlens, batch.tokens.device)
    media = {**batch.media(), **{name: getattr(host, name) for name in HOST_FIELDS}}
    output = model(batch.tokens, batch.position_ids, labels=batch.labels, packed_seq_params=packed, **media)
    return output, partial(token_loss_sum, batch.loss_mask, batch.loss_weights)
