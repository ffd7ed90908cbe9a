"""Webdataset-style tar shards with an index, read by global sample number.

Layout of a prepared folder: ``shard-00000.tar ...`` (per sample ``{key}.json`` with the
messages, and ``{key}.{i}.{ext}`` with the bytes of medium i) and ``index.json`` (per
sample: shard, byte offsets and sizes of its members). Samples are shuffled once, by seed,
when written.

Why not megatron-energon's loader for megavlm's own shards: its loader
is an IterableDataset with shuffle buffers whose saved state is per rank (and per worker)
and restores into that layout (``save_state_rank`` / ``restore_state_rank``). megavlm's
position is one integer (consumed samples) that resumes into any DP size and worker count
and is the same for every model-parallel rank, which needs random access to sample ``i``:
an index of byte offsets gives that in one seek. The tar layout stays webdataset-style, so
webdataset tooling can still read the shards. Existing webdataset and Energon-prepared
folders are read by ``data/webdataset.py`` (Energon's index readers, megavlm's order).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np

from megavlm.data.sample import Media, Message, Sample

INDEX = "index.json"


def _media_bytes(media: Media) -> tuple[bytes, str]:
    if media.data is not None:
        return media.data, ".bin"
    if media.path is not None:
        return Path(media.path).read_bytes(), Path(media.path).suffix or ".bin"
    if media.kind == "image":  # decoded pixels (synthetic): store as PNG
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(media.array).save(buf, format="PNG")
        return buf.getvalue(), ".png"
    buf = io.BytesIO()
    np.save(buf, media.array)
    return buf.getvalue(), ".npy"


def write_shards(samples: Iterable[Sample], out: str | Path, *, shard_size: int = 1000, seed: int = 0) -> int:
    """Write ``samples`` (shuffled by ``seed``) as tar shards plus ``index.json``; returns the count."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = list(samples)
    order = np.random.default_rng(seed).permutation(len(samples))
    entries, tar, shard = [], None, -1
    for n, i in enumerate(order):
        if n % shard_size == 0:
            if tar is not None:
                tar.close()
            shard += 1
            tar = tarfile.open(out / f"shard-{shard:05d}.tar", "w")
        sample = samples[int(i)]
        key = f"{n:09d}"
        members: list = []
        header = {"id": sample.id, "messages": [asdict(m) for m in sample.messages], "targets": sample.targets,
                  "media": [{"kind": m.kind, "fps": m.fps} for m in sample.media]}
        payloads = [(f"{key}.json", json.dumps(header).encode())]
        for k, media in enumerate(sample.media):
            data, ext = _media_bytes(media)
            payloads.append((f"{key}.{k}{ext}", data))
        for name, data in payloads:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            members.append(name)
        entries.append({"shard": f"shard-{shard:05d}.tar", "members": members})
    if tar is not None:
        tar.close()
    offsets = {}  # (shard, member) -> (data offset, size), read back from the written tars
    for name in sorted({e["shard"] for e in entries}):
        with tarfile.open(out / name) as t:
            offsets.update({(name, m.name): (m.offset_data, m.size) for m in t.getmembers()})
    for e in entries:
        e["members"] = [[m, *offsets[(e["shard"], m)]] for m in e["members"]]
    (out / INDEX).write_text(json.dumps({"count": len(entries), "seed": seed, "samples": entries}))
    return len(entries)


class ShardDataset:
    """Index -> ``Sample`` of a prepared folder (media as bytes, decoded by the encoder)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"data.path={path}: no {INDEX}; prepare it with tools/prepare_data.py")
        self.entries = json.loads(index.read_text())["samples"]

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: str, offset: int, size: int) -> bytes:
        with open(self.path / shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def __getitem__(self, index: int) -> Sample:
        entry = self.entries[index % len(self.entries)]
        (_, offset, size), *media_members = entry["members"]
        header = json.loads(self._read(entry["shard"], offset, size))
        media = []
        for spec, (name, off, sz) in zip(header["media"], media_members):
            data = self._read(entry["shard"], off, sz)
            if name.endswith(".npy"):
                media.append(Media(spec["kind"], array=np.load(io.BytesIO(data)), fps=spec["fps"]))
            else:
                media.append(Media(spec["kind"], data=data, fps=spec["fps"]))
        messages = [Message(m["role"], m["content"], reasoning=m.get("reasoning")) for m in header["messages"]]
        return Sample(id=header["id"], messages=messages, media=media, targets=header["targets"])


def prepare(output: str | Path, *, inputs: list[str] = (), fmt: str = "auto", synthetic: int = 0, seed: int = 0,
            shard_size: int = 1000) -> tuple[int, dict[str, list[str]]]:
    """Read JSONL inputs (and/or ``synthetic`` built-in samples) and write shards.

    Returns the number written and the bad records by reason (``file:line: detail``)."""
    from megavlm.data.formats import BadRecord, read_samples
    from megavlm.data.synthetic import SyntheticMultimodalDataset

    samples, bad = [], {}
    for path in inputs:
        for item in read_samples(path, fmt):
            if isinstance(item, BadRecord):
                bad.setdefault(item.reason, []).append(f"{item.where}: {item.detail}")
            else:
                samples.append(item)
    if synthetic:
        data = SyntheticMultimodalDataset(seed=seed)
        samples += [data[i] for i in range(synthetic)]
    return write_shards(samples, output, shard_size=shard_size, seed=seed), bad
