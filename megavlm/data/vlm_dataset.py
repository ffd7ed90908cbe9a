"""Samples -> single-row training Batches for a VLM: encode, position ids, pad or pack.

``EncodedDataset`` turns sample ``i`` of any random-access source (the synthetic set, a
prepared shard set) into one unpadded row with its media and MRoPE (or 1D) position ids;
``PaddedDataset`` pads rows to ``data.seq_length``, or ``packing.PackedDataset`` packs them.
The row for an index never changes, so a run's data position stays one integer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from megavlm.config.schema import ModelConfig
from megavlm.data.batch import Batch
from megavlm.data.encode import DECODE_COUNTS, SampleEncoder, SampleError
from megavlm.positions import sample_position_ids


BAD_REASONS = ("bad_image", "bad_video", "missing_media", "image_too_small", "image_too_large", "image_aspect",
               "too_long", "other", "bad_record", "empty_conversation")


# What a Batch's ``sample_counts`` hold, in order: samples seen, skipped per reason, then how
# their images and videos were decoded (encode.DECODE_COUNTS: DALI, or the counted fallbacks).
COUNT_NAMES = ("seen", *BAD_REASONS, *DECODE_COUNTS)


def sample_counts(reason: str | None = None, decoded: dict[str, int] | None = None) -> torch.Tensor:
    """``COUNT_NAMES`` of one sample: seen = 1, a one-hot skip reason, its media decodes."""
    counts = torch.zeros(len(COUNT_NAMES))
    counts[0] = 1
    if reason is not None:
        counts[1 + BAD_REASONS.index(reason if reason in BAD_REASONS else "other")] = 1
    for name, n in (decoded or {}).items():
        counts[COUNT_NAMES.index(name)] = n
    return counts


class EncodedDataset:
    """Index ``i`` -> the encoded, unpadded single-row Batch of ``source[i]``.

    Nothing is cached here: the packer keeps the rows it read until it serves them, and the
    evaluator keeps its own batches. (An LRU cache of 256 encoded rows, pixels included, used
    to sit here: up to several GB per loader process with megapixel images, and after the
    packer stopped re-reading the tail of its last chunk, training never hit it.)"""

    def __init__(self, source: Sequence, encode: SampleEncoder, model: ModelConfig):
        self.source = source
        self.encode = encode
        self.model = model
        self._read: dict = {}  # samples read by __getitems__, not yet encoded

    def _empty(self) -> Batch:
        empty = torch.zeros(1, 0, dtype=torch.long)
        positions = torch.zeros(3, 1, 0, dtype=torch.long) if self.model.rope.kind.startswith("mrope") else empty
        return Batch(tokens=empty, labels=empty, loss_mask=empty.float(), position_ids=positions)

    def __len__(self) -> int:
        return len(self.source)

    def _build(self, i: int) -> Batch:
        try:
            enc = self.encode(self._read.pop(i) if i in self._read else self.source[i])
        except SampleError as e:
            # Skipped, counted and reported; the row stays (empty) so row i never moves.
            return dataclasses.replace(self._empty(), sample_counts=sample_counts(e.reason), notes=[str(e)])
        tokens = enc.tokens[None, :]
        return Batch(
            tokens=tokens,
            labels=enc.labels.clamp(min=0)[None, :],
            loss_mask=enc.loss_mask.float()[None, :],
            position_ids=sample_position_ids(enc.tokens, enc.image_grid_thw, enc.video_grid_thw, self.model).unsqueeze(-2),
            pixel_values=enc.pixel_values,
            image_grid_thw=enc.image_grid_thw,
            pixel_values_videos=enc.pixel_values_videos,
            video_grid_thw=enc.video_grid_thw,
            sample_counts=sample_counts(decoded=enc.decode_counts),
        )

    def __getitem__(self, i: int) -> Batch:
        return self._build(i)

    def length(self, i: int) -> int:
        """Tokens of row ``i`` from headers, nothing decoded (``SampleEncoder.num_tokens``): what
        the packer plans with; 0 for a sample that will be skipped (its row is empty)."""
        try:
            return self.encode.num_tokens(self.source[i])
        except SampleError:
            return 0

    def __getitems__(self, indices: list[int]) -> list[Batch]:
        """Rows of several samples, their encoded images decoded in one batch (DALI): a
        ``DataLoader`` calls this once per micro-batch, ``PackedDataset`` per window chunk."""
        prefetch = getattr(self.encode, "prefetch", None)
        if prefetch is None:
            return [self._build(i) for i in indices]
        for i in indices:
            try:
                self._read[i] = self.source[i]
            except Exception:  # noqa: BLE001 - a sample that cannot be read is named by _build
                pass
        try:
            prefetch(list(self._read.values()))
            return [self._build(i) for i in indices]
        finally:  # a sample that failed to read left nothing; clear what is left
            self._read.clear()
            self.encode.drop_prefetched()


class PaddedDataset:
    """Rows padded on the right to ``seq_length`` (no loss on padding)."""

    def __init__(self, source: Sequence[Batch], *, seq_length: int, pad_token_id: int):
        self.source = source
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id

    def __getitem__(self, i: int) -> Batch:
        row = self.source[i]
        n = row.tokens.shape[-1]
        pad = self.seq_length - n
        if pad < 0:
            raise ValueError(f"sample {i}: {n} tokens exceed data.seq_length={self.seq_length}")
        start = row.position_ids[..., -1:] + 1 if n else torch.zeros(*row.position_ids.shape[:-1], 1, dtype=torch.long)
        positions = torch.cat([row.position_ids, start + torch.arange(pad).expand(*start.shape[:-1], pad)], dim=-1)
        return Batch(
            tokens=F.pad(row.tokens, (0, pad), value=self.pad_token_id),
            labels=F.pad(row.labels, (0, pad)),
            loss_mask=F.pad(row.loss_mask, (0, pad)),
            position_ids=positions,
            **row.media(),
            sample_counts=row.sample_counts,
            notes=row.notes,
        )
