"""Existing webdataset shards as a megavlm sample source, read by global sample index.

``data.dataset=webdataset`` with ``data.path`` either

* a folder of plain webdataset tars (``*.tar``, searched recursively, in path order): files
  grouped by key (``000001.json``, ``000001.jpg``, ...). Read with ``wids``
  (``wids.IndexedTarSamples``: the webdataset authors' random-access reader, one mmap scan of
  the tar headers per shard). wids' own ``ShardListDataset`` is not used: it copies local
  shards into a cache folder and needs the per-shard counts up front;
* a Megatron-Energon-prepared folder (``.nv-meta/``): the ``data.split`` shard list (``train``;
  evaluation reads ``val``) of
  ``split.yaml``, the per-shard sample counts of ``.info.json``/``.info.yaml`` and the
  ``<shard>.tar.idx`` byte offsets, all read by Energon's own ``WebdatasetMeta`` and
  ``ShardInfosITarReader`` (random access by index, no scan). Energon's loader itself is not
  used: its order and saved state are per rank and worker (see ``megavlm/data/shards.py``).

On top, megavlm's order: global sample ``i`` is sample ``perm_e[i % n]`` of epoch
``e = i // n``, where ``perm_e`` is a permutation seeded by ``(data.seed, e)``. The order is a
pure function of ``i``, so the data position stays one integer (``data.sampler``) and resumes
exactly into any DP size and worker count.

How a sample becomes a megavlm conversation (``Sample``):

* conversation JSON (plain tars; Energon ``CrudeWebdataset`` or no ``dataset.yaml``): the
  ``json`` member holds an HF chat (``messages``) or LLaVA (``conversations``) record as in
  ``megavlm.data.formats``; a media reference names a member of the same sample by its
  extension (``"jpg"``, ``"0.png"``) or full name (``"000001.jpg"``);
* no ``json`` member, one image and a ``txt`` member: a caption (as below);
* Energon ``CaptioningSample`` (crude mapping): user turn = the image, assistant = ``caption``;
* Energon ``VQASample`` (crude mapping): user turn = the image, then ``context``; assistant =
  the answer of highest ``answer_weights`` (the first of ``answers`` without weights), which
  is also the sample's ``targets["answer"]`` (what RL's exact-answer reward checks).
  Energon's ``field_map`` (``json[question]``, ``jpg,png``) is resolved with Energon's own
  field access. Other sample types and ``sample_loader`` scripts are refused by name.

A member that cannot be used (malformed JSON, a missing referenced member, no image or
text where the mapping needs one) raises ``SampleError`` with ``bad_record`` or
``missing_media``; ``EncodedDataset`` counts it and leaves an empty row, like a corrupt image.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from megavlm.data.encode import SampleError
from megavlm.data.formats import MediaMismatch, _from_hf_chat, _from_llava, detect_format
from megavlm.data.sample import Media, Message, Sample

ENERGON_META = ".nv-meta"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


def is_energon(path: str | Path) -> bool:
    return (Path(path) / ENERGON_META).is_dir()


def plain_tars(path: str | Path) -> list[Path]:
    """The ``*.tar`` files under ``path``, in path order (hidden folders skipped)."""
    root = Path(path)
    return sorted(p for p in root.rglob("*.tar") if not any(s.startswith(".") for s in p.relative_to(root).parts))


class _WidsShards:
    """Plain tars: global index -> (shard name, key, {ext: bytes}) through ``wids``."""

    def __init__(self, path: Path, *, open_shards: int = 8):
        from wids.wids import IndexedTarSamples

        self.root, self.tars, self.open_shards = path, plain_tars(path), open_shards
        if not self.tars:
            raise FileNotFoundError(f"data.path={path}: no .tar files and no {ENERGON_META}/ folder")
        counts = []
        for tar in self.tars:  # one header scan per shard; a truncated tar fails here, by name
            try:
                shard = IndexedTarSamples(path=str(tar))
            except Exception as e:  # noqa: BLE001 - any reader error means the shard is unusable
                raise ValueError(f"data.path={path}: cannot index {tar.name}: {type(e).__name__}: {e}") from e
            counts.append(len(shard))
            shard.close()
        self.cumulative = np.cumsum([0, *counts])
        self._open: dict[int, Any] = {}

    def __getstate__(self):  # loader workers reopen their own shards
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def __getitem__(self, index: int) -> tuple[str, str, dict[str, bytes]]:
        from wids.wids import IndexedTarSamples

        s = int(np.searchsorted(self.cumulative, index, side="right")) - 1
        if s not in self._open:
            if len(self._open) >= self.open_shards:
                self._open.pop(next(iter(self._open))).close()
            self._open[s] = IndexedTarSamples(path=str(self.tars[s]))
        raw = self._open[s][index - int(self.cumulative[s])]
        parts = {ext.lstrip("."): value.getvalue() for ext, value in raw.items() if ext != "__key__"}
        return str(self.tars[s].relative_to(self.root)), raw["__key__"], parts


class _EnergonShards:
    """An Energon-prepared folder: global index -> (shard name, key, {ext: bytes}), and the
    sample type and field map of its ``dataset.yaml``."""

    def __init__(self, path: Path, split: str = "train"):
        import yaml
        from megatron.energon.epathlib import EPath
        from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

        self.root, self.split = path, split
        meta = WebdatasetMeta.from_config(EPath(path), split_part=split)
        if meta.sample_excludes:
            raise ValueError(f"data.path={path}: {ENERGON_META}/split.yaml excludes single samples "
                             f"({sorted(meta.sample_excludes)[:3]}...); megavlm supports excluding whole shards only")
        self.shards = meta.shards
        self.count = sum(s.count for s in meta.shards)
        self.sample_type, self.field_map = _energon_sample_type(path, yaml)
        self._reader = None

    def __getstate__(self):  # open tar and index handles stay in the process that made them
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[str, str, dict[str, bytes]]:
        if self._reader is None:
            from megatron.energon.epathlib import EPath
            from megatron.energon.flavors.webdataset.itar_reader import ShardInfosITarReader

            self._reader = ShardInfosITarReader(EPath(self.root), self.shards)
        raw = self._reader[index]
        parts = {k: v for k, v in raw.items() if not k.startswith("__")}
        return raw["__shard__"], raw["__key__"], parts


SAMPLE_TYPES = ("CaptioningSample", "VQASample", "CrudeWebdataset")


def _energon_sample_type(path: Path, yaml) -> tuple[str, dict | None]:
    """``(sample type, field map)`` of ``.nv-meta/dataset.yaml``; a missing file means
    conversation JSON samples (as in plain tars)."""
    file = path / ENERGON_META / "dataset.yaml"
    if not file.is_file():
        return "CrudeWebdataset", None
    spec = yaml.safe_load(file.read_text()) or {}
    if "sample_loader" in spec:
        raise ValueError(f"{file}: sample_loader scripts are not run by megavlm; use a field_map "
                         f"with one of {', '.join(SAMPLE_TYPES[:2])}, or conversation JSON samples")
    # current form: sample_type: {__class__: VQASample}; deprecated: __class__: VQAWebdataset
    name = (spec.get("sample_type") or {}).get("__class__") or spec.get("__class__", "CrudeWebdataset")
    if name.endswith("Webdataset") and name != "CrudeWebdataset":
        name = name[: -len("Webdataset")] + "Sample"
    if name not in SAMPLE_TYPES:
        raise ValueError(f"{file}: sample type {name!r} has no megavlm mapping; supported: {', '.join(SAMPLE_TYPES)}")
    if name != "CrudeWebdataset" and not spec.get("field_map"):
        raise ValueError(f"{file}: {name} needs a field_map")
    return name, spec.get("field_map")


class WebdatasetSource:
    """Index -> ``Sample`` of a plain webdataset folder or an Energon-prepared one, in
    megavlm's seeded, resumable order (see the module docstring)."""

    def __init__(self, path: str | Path, *, seed: int = 0, shuffle: bool = True, split: str = "train"):
        path = Path(path)
        if split != "train" and not is_energon(path):
            raise ValueError(f"{path}: split {split!r} needs an Energon-prepared folder (.nv-meta/split.yaml); "
                             "plain webdataset tars have no splits")
        self.shards = _EnergonShards(path, split) if is_energon(path) else _WidsShards(path)
        self.seed, self.shuffle = seed, shuffle
        self._epoch: tuple[int, np.ndarray] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_epoch": None}

    def __len__(self) -> int:
        return len(self.shards)

    def position(self, index: int) -> int:
        """The stored sample (shard order) that global sample ``index`` reads."""
        n = len(self.shards)
        epoch, k = divmod(index, n)
        if not self.shuffle:
            return k
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return int(self._epoch[1][k])

    def __getitem__(self, index: int) -> Sample:
        position = self.position(index)
        try:
            shard, key, parts = self.shards[position]
        except (tarfile.TarError, EOFError, ValueError) as e:  # a damaged tar header: this sample only
            raise SampleError(f"{self.shards.root}#{position}", "bad_record", f"{type(e).__name__}: {e}") from None
        sid = f"{shard}/{key}"
        sample_type = getattr(self.shards, "sample_type", "CrudeWebdataset")
        if sample_type == "CrudeWebdataset":
            return conversation_sample(sid, parts)
        return energon_sample(sid, parts, sample_type, self.shards.field_map)


def _json(sid: str, parts: dict[str, bytes], ext: str) -> Any:
    try:
        return json.loads(parts[ext])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(sid, "bad_record", f"member .{ext}: malformed JSON: {e}") from None


def _media_kind(ext: str) -> str | None:
    last = ext.rsplit(".", 1)[-1].lower()
    return "image" if last in IMAGE_EXTS else "video" if last in VIDEO_EXTS else None


def _caption(sid: str, image: Any, caption: Any, question: str | None = None, targets: dict | None = None) -> Sample:
    if not isinstance(image, (bytes, bytearray)):
        raise SampleError(sid, "missing_media", f"no image bytes (got {type(image).__name__})")
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError(sid, "empty_conversation", "no answer or caption text")
    user = [{"type": "image", "index": 0}] + ([{"type": "text", "text": question}] if question else [])
    return Sample(id=sid, media=[Media("image", data=bytes(image))], targets=targets,
                  messages=[Message("user", user), Message("assistant", [{"type": "text", "text": caption}])])


def conversation_sample(sid: str, parts: dict[str, bytes]) -> Sample:
    """A conversation-JSON sample (or image + ``txt`` caption) -> ``Sample``."""
    if "json" not in parts:
        images = [ext for ext in parts if _media_kind(ext) == "image"]
        if len(images) == 1 and "txt" in parts:
            return _caption(sid, parts[images[0]], parts["txt"].decode("utf-8", errors="replace"))
        raise SampleError(sid, "bad_record", f"no .json conversation member (members: {sorted(parts)})")
    record = _json(sid, parts, "json")
    try:
        reader = {"hf": _from_hf_chat, "llava": _from_llava}[detect_format(record)]
        sample = reader(record, str(record.get("id", sid)), Path(""))  # media refs stay as written
    except MediaMismatch as e:
        raise SampleError(sid, "bad_record", f"media_mismatch: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise SampleError(sid, "bad_record", f"{type(e).__name__}: {e}") from None
    key = sid.rsplit("/", 1)[-1]
    for media in sample.media:
        ref = media.path.removeprefix(key + ".").lstrip(".")
        if ref not in parts:
            raise SampleError(sid, "missing_media", f"{media.kind} {media.path!r} is not a member of the sample")
        media.path, media.data = None, parts[ref]
    return sample


def energon_sample(sid: str, parts: dict[str, bytes], sample_type: str, field_map: dict) -> Sample:
    """An Energon ``CaptioningSample`` or ``VQASample`` (through its ``field_map``) -> ``Sample``."""
    from megatron.energon.flavors.webdataset.field_access import field_access, split_field_access

    # What Energon's default decoder gives the field map (JSON and text decoded, media as
    # bytes), for the members the field map names: a bad member it does not use costs nothing.
    used = {option[0] for desc in field_map.values() for option in split_field_access(str(desc))}
    fields: dict[str, Any] = {}
    for ext, data in parts.items():
        last = ext.rsplit(".", 1)[-1]
        if ext in used:
            fields[ext] = _json(sid, parts, ext) if last == "json" else (
                data.decode("utf-8", errors="replace") if last == "txt" else data)

    def get(name: str, required: bool = True):
        if name not in field_map:
            if required:
                raise SampleError(sid, "bad_record", f"dataset.yaml field_map has no {name!r}")
            return None
        try:
            return field_access(fields, split_field_access(field_map[name]))
        except (KeyError, ValueError, IndexError, TypeError) as e:
            if not required:
                return None
            raise SampleError(sid, "bad_record", f"field {name!r} ({field_map[name]}): {e}") from None

    if sample_type == "CaptioningSample":
        return _caption(sid, get("image"), get("caption"))
    answers, weights = get("answers", required=False), get("answer_weights", required=False)
    if isinstance(answers, list):
        best = int(np.argmax(weights)) if weights is not None and len(weights) == len(answers) else 0
        answers = answers[best] if answers else None
    context = get("context")
    # the answer is also the sample's verifiable target (RL's exact-answer reward)
    return _caption(sid, get("image"), answers, context if isinstance(context, str) else json.dumps(context),
                    targets={"answer": answers} if isinstance(answers, str) else None)
