"""Layer implementation choice: no silent fallback from Transformer Engine on a GPU machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megavlm.config import ConfigError, load_config, validate
from megavlm.models.transformer_config import precision_and_kernels
from megavlm.platform import device

REPO = Path(__file__).parents[2]


@pytest.fixture
def cuda_without_te(monkeypatch):
    """A CUDA machine whose Transformer Engine fails to import (as a broken wheel does)."""
    monkeypatch.setattr(device, "has_cuda", lambda: True)
    monkeypatch.setattr(device, "transformer_engine_import_error",
                        lambda: "import transformer_engine.pytorch failed: OSError: libcudnn.so.9: cannot open")


def test_cuda_without_te_is_an_error_showing_the_import_error(cuda_without_te):
    for impl in ("auto", "transformer_engine"):
        with pytest.raises(RuntimeError, match=r"libcudnn\.so\.9.*model\.transformer_impl=local"):
            device.use_transformer_engine(impl)


def test_local_layers_on_gpu_are_an_explicit_choice(cuda_without_te):
    assert device.use_transformer_engine("local") is False


def test_cpu_uses_local_layers_and_refuses_to_insist_on_te():
    if device.has_cuda():
        pytest.fail("this test describes the CPU machine CI runs on")
    assert device.use_transformer_engine("auto") is False
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        device.use_transformer_engine("transformer_engine")
    with pytest.raises(ValueError, match="model.transformer_impl"):
        device.use_transformer_engine("apex")


def test_wgrad_fusion_only_with_its_kernel(monkeypatch):
    """megatron's local linear layers raise without apex's fused_weight_gradient_mlp_cuda."""
    assert precision_and_kernels(torch.float32, use_te=False)["gradient_accumulation_fusion"] is False
    monkeypatch.setattr(device, "has_cuda", lambda: True)
    assert device.has_wgrad_accumulation_fusion(use_te=True) is True
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fused_weight_gradient_mlp_cuda" else real(name, *a))
    assert device.has_wgrad_accumulation_fusion(use_te=False) is False


def test_transformer_impl_is_validated_before_launch():
    with pytest.raises(ConfigError, match="model.transformer_impl"):
        validate(load_config(None, ["model.preset=qwen3-tiny", "model.transformer_impl=te"]), 1)


def test_cuda_is_asked_only_through_platform():
    """Hardware questions have one home (DESIGN: platform/ and layer-spec selection)."""
    offenders = []
    for folder in ("megavlm", "tools", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "platform" in path.relative_to(REPO).parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"cuda\.is_available\(", line):
                    offenders.append(f"{path.relative_to(REPO)}:{i}")
    assert not offenders, "use megavlm.platform.device.has_cuda(): " + ", ".join(offenders)
