"""Where PPO's prompts come from: the training prompts and the held-out ones (``rl.eval_prompts``).

* ``synthetic_multimodal``: the generator with ``data.seed`` (training) and ``data.seed + 1``
  (held-out), restricted to ``rl.tasks``;
* ``webdataset`` on an Energon-prepared folder with a ``val`` split: ``data.split`` for
  training, ``val`` held out;
* ``shards``, or ``webdataset`` without a ``val`` split: the last ``rl.eval_prompts`` samples
  (in the folder's seeded order) are held out and never used as training prompts.

The samples need ``targets`` for verifiable rewards: synthetic and prepared shards carry
them; webdataset conversation JSON carries them as a ``targets`` member, Energon VQA samples
as their best answer (``megavlm.data.webdataset``).
"""

from __future__ import annotations

from collections.abc import Sequence

from megavlm.config.schema import Config
from megavlm.config.validate import energon_has_split


class _Range(Sequence):
    """Samples ``start .. stop - 1`` of ``source``, indexed from 0."""

    def __init__(self, source: Sequence, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + i]


def prompt_sources(cfg: Config) -> tuple[Sequence, Sequence]:
    """``(training prompts, held-out prompts)`` for ``cfg.data`` (see the module docstring)."""
    from megavlm.data.shards import ShardDataset
    from megavlm.data.synthetic import SyntheticMultimodalDataset
    from megavlm.data.webdataset import WebdatasetSource

    d, r = cfg.data, cfg.rl
    if d.dataset == "synthetic_multimodal":
        return (SyntheticMultimodalDataset(seed=d.seed, tasks=tuple(r.tasks)),
                SyntheticMultimodalDataset(seed=d.seed + 1, tasks=tuple(r.tasks)))
    if d.dataset == "webdataset":
        source = WebdatasetSource(d.path, seed=d.seed, split=d.split)
        if d.split != "val" and energon_has_split(d.path, "val"):
            return source, WebdatasetSource(d.path, seed=d.seed, split="val")
    elif d.dataset == "shards":
        source = ShardDataset(d.path)
    else:
        raise ValueError(f"data.dataset={d.dataset!r}: PPO needs prompts with targets "
                         "(synthetic_multimodal, shards or webdataset)")
    held = r.eval_prompts
    if held >= len(source):
        raise ValueError(f"rl.eval_prompts={held} holds out every sample of data.path={d.path} ({len(source)} samples)")
    return _Range(source, 0, len(source) - held), _Range(source, len(source) - held, len(source))
