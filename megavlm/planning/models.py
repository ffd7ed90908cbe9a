"""What the planner can plan: megavlm's presets, language models and Qwen3-VL VLMs.

A language model is always megavlm's own ``LanguageModelConfig``, resolved through
``megavlm.config.load_config`` from a preset and dotted ``model.language.*`` overrides, so
the planner counts exactly the model megavlm builds. A Qwen3-VL preset's ViT is described
by a ``VisionSpec`` read from the preset's ``VisionConfig`` (its parameters are counted as
megavlm builds them; tests check the count against the built module). STEP3-VL's PE
encoder has no ``VisionSpec``: the planner plans its decoder only and says so.
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

    Parallel placement (as megavlm's VLMModel does it): on the first pipeline stage; linear layers split over TP like the decoder's (column: QKV, fc1; row: proj,
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


def _vision_spec(name: str) -> VisionSpec | None:
    model = presets.get(name)
    v = model.vision
    if v is None or v.kind != "qwen3vl":
        return None
    return VisionSpec(
        num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
        num_heads=v.num_attention_heads, out_hidden_size=model.language.hidden_size, patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, in_channels=v.in_channels,
        spatial_merge_size=model.projector.spatial_merge_size, num_position_embeddings=v.position_embedding_size**2,
        deepstack_mergers=len(v.deepstack_layers),
    )


def model_names() -> list[str]:
    return presets.names()


def get_model(name: str, vision: VisionSpec | None = None) -> PlanModel:
    """A megavlm preset; ``vision`` replaces its ViT (a planner-only what-if)."""
    if name not in presets.names():
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    preset = presets.get(name)
    note = ""
    if preset.vision is not None and preset.vision.kind != "qwen3vl":
        note = f"{name}: the {preset.vision.kind} vision encoder is not modelled; planning the decoder only"
    model = PlanModel(name=name, preset=name, vision=_vision_spec(name), note=note)
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
