"""What the planner can plan: megavlm's language presets, plus planner-only VLM entries.

A language model is always megavlm's own ``LanguageModelConfig``, resolved through
``megavlm.config.load_config`` from a preset and dotted ``model.language.*`` overrides, so
the planner counts exactly the model megavlm builds. The vision tower is described by a
``VisionSpec``: megavlm has no VLM yet, so ``qwen3vl-*`` entries are *planner-only*
(their vision part is an estimate from the Hugging Face architecture, see ``VisionSpec``)
until the VLM lands; their language part is the real megavlm preset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megavlm.config import presets


@dataclass(frozen=True)
class VisionSpec:
    """A Qwen3-VL style ViT, counted as Hugging Face's ``Qwen3VLVisionModel`` builds it.

    Modules: Conv3d patch embedding (``in_channels x temporal_patch_size x patch_size^2 ->
    hidden``, with bias), a learned position table (``num_position_embeddings x hidden``),
    ``num_layers`` pre-LayerNorm blocks (LayerNorm with bias; fused QKV and output
    projection with bias; full bidirectional attention with 2D RoPE; GELU MLP
    ``hidden -> ffn -> hidden`` with bias), a patch merger (LayerNorm over ``hidden``, then
    ``4*hidden -> 4*hidden -> out_hidden_size`` MLP for ``spatial_merge_size^2 = 4``
    patches per visual token) and ``deepstack_mergers`` more mergers (LayerNorm over
    ``4*hidden``) whose outputs are added to early decoder layers.

    Parallel placement assumed (megavlm's VLM does not exist yet): on the first pipeline
    stage; linear layers split over TP like the decoder's (column: QKV, fc1; row: proj,
    fc2; column biases split, row biases replicated); norms, patch embedding and position
    table replicated; sequence parallel like the decoder; the patches of a micro-batch
    split evenly over CP ranks.

    Workload: ``patches_per_sample`` patches per sequence; when None, enough patches for
    ``visual_token_fraction`` of the sequence to be visual tokens
    (``patches = fraction * seq_length * spatial_merge_size^2``). Attention runs within
    images of ``patches_per_image`` patches (4096 = one 1024x1024 image at patch 16).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    deepstack_mergers: int = 0
    patches_per_sample: int | None = None
    patches_per_image: int = 4096
    visual_token_fraction: float = 0.5

    @property
    def merge(self) -> int:
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def patches(self, seq_length: int) -> int:
        """Patches per sample (sequence) for a sequence of ``seq_length`` tokens."""
        if self.patches_per_sample is not None:
            return self.patches_per_sample
        visual_tokens = int(self.visual_token_fraction * seq_length)
        return visual_tokens * self.merge


@dataclass(frozen=True)
class PlanModel:
    """A plannable model: a megavlm language preset (+ overrides) and an optional ViT."""

    name: str
    preset: str
    language_overrides: tuple[str, ...] = ()  # dotted keys under model.language
    vision: VisionSpec | None = None
    planner_only: bool = False
    note: str = ""

    def config_overrides(self) -> list[str]:
        return [f"model.preset={self.preset}", *(f"model.language.{o}" for o in self.language_overrides)]


# Qwen3-VL (Hugging Face configs of Qwen/Qwen3-VL-8B-Instruct and Qwen3-VL-2B-Instruct):
# the text models have the Qwen3-8B / Qwen3-1.7B shapes with a 256K context; the ViTs
# below are their vision_config (depth, hidden_size, intermediate_size, num_heads,
# out_hidden_size, deepstack_visual_indexes).
_VLM: dict[str, PlanModel] = {
    "qwen3vl-8b": PlanModel(
        name="qwen3vl-8b",
        preset="qwen3-8b",
        language_overrides=("max_position_embeddings=262144",),
        vision=VisionSpec(
            num_layers=27,
            hidden_size=1152,
            ffn_hidden_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            deepstack_mergers=3,
        ),
        planner_only=True,
        note="planner-only until megavlm's VLM lands: qwen3-8b decoder + 27x1152 ViT (estimated)",
    ),
    "qwen3vl-2b": PlanModel(
        name="qwen3vl-2b",
        preset="qwen3-1.7b",
        language_overrides=("max_position_embeddings=262144",),
        vision=VisionSpec(
            num_layers=24,
            hidden_size=1024,
            ffn_hidden_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            deepstack_mergers=3,
        ),
        planner_only=True,
        note="planner-only until megavlm's VLM lands: 2048x28 tied decoder + 24x1024 ViT (estimated)",
    ),
}


def model_names() -> list[str]:
    return sorted([*presets.names(), *_VLM])


def get_model(name: str, vision: VisionSpec | None = None) -> PlanModel:
    """A megavlm LM preset or a planner-only VLM entry; ``vision`` replaces its ViT."""
    if name in _VLM:
        model = _VLM[name]
    elif name in presets.names():
        model = PlanModel(name=name, preset=name)
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    if vision is not None:
        model = PlanModel(
            name=model.name,
            preset=model.preset,
            language_overrides=model.language_overrides,
            vision=vision,
            planner_only=True,
            note=model.note or "vision tower given to the planner (estimate)",
        )
    return model


def with_patches(model: PlanModel, patches_per_sample: int | None) -> PlanModel:
    """The same model with a fixed number of vision patches per sample."""
    if model.vision is None or patches_per_sample is None:
        return model
    return replace(model, vision=replace(model.vision, patches_per_sample=patches_per_sample))


__all__ = ["PlanModel", "VisionSpec", "get_model", "model_names", "with_patches"]
