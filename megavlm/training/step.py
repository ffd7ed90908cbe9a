"""What megatron's pipeline schedules call for one micro-batch: forward and the loss."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import unwrap_model

from megavlm.data.batch import Batch
from megavlm.parallel.context import shard_for_cp
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
# them (lengths, grid sizes) never synchronizes with the device in the forward. The host
# tokens go along too: the model counts media placeholders there.
HOST_FIELDS = ("image_grid_thw", "video_grid_thw")


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module, *, supervised_logits_only: bool = True):
    """megatron's ``forward_step_func``; ``supervised_logits_only`` (``train.supervised_logits_only``,
    bound by the caller) gives the model the loss mask, so logits exist only where it is non-zero."""
    host = next(data_iterator)
    batch = host.to(device.device())
    media = {**batch.media(), **{name: getattr(host, name) for name in HOST_FIELDS}, "host_tokens": host.tokens}
    if parallel_state.get_context_parallel_world_size() > 1:
        return _forward_context_parallel(batch, model, media, supervised_logits_only)
    packed = None if host.cu_seqlens is None else packed_seq_params(host.cu_seqlens, batch.tokens.device)
    output = model(batch.tokens, batch.position_ids, labels=batch.labels, packed_seq_params=packed,
                   loss_mask=host.loss_mask if supervised_logits_only else None, **media)  # host: no sync
    return output, partial(token_loss_sum, batch.loss_mask, batch.loss_weights)


def _forward_context_parallel(batch: Batch, model: torch.nn.Module, media: dict, supervised_logits_only: bool):
    """This CP rank's share of the micro-batch through the model (megavlm.parallel.context);
    the loss is the token sum of the share, which megatron's per-token normalization turns
    into the global-batch loss over DP x CP."""
    chunk = unwrap_model(model)
    shard = shard_for_cp(
        tokens=batch.tokens, labels=batch.labels, loss_mask=batch.loss_mask,
        loss_weights=batch.loss_weights, position_ids=batch.position_ids,
        cu_seqlens=batch.cu_seqlens, sample_ids=batch.sample_ids,
        cp_size=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        pad_token_id=0,  # fills padded tails, which attention and the loss never see
        packed_format="thd" if chunk.use_te else "sbhd",
    )
    output = model(
        shard.tokens, shard.position_ids, labels=shard.labels, packed_seq_params=shard.packed_seq_params,
        cp_partition=shard.partition, loss_mask=shard.loss_mask if supervised_logits_only else None, **media,
    )
    return output, partial(token_loss_sum, shard.loss_mask, shard.loss_weights)
