"""Context parallelism without Transformer Engine: the zigzag token split (regular and packed)
and ring attention over a CP process group. See DESIGN.md; imports only platform, config and
positions."""

from .partition import CPPartition, cp_partition, pad_cu_seqlens, pad_packed, split_for_cp
from .ring_attention import ring_attention

__all__ = ["CPPartition", "cp_partition", "pad_cu_seqlens", "pad_packed", "split_for_cp", "ring_attention"]
