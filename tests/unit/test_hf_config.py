"""HF Qwen3-VL config.json <-> megavlm ModelConfig."""

from __future__ import annotations

import dataclasses

import pytest

from megavlm.config import presets
from megavlm.conversion.hf_config import HFConfigError, hf_config_from_model, model_config_from_hf


@pytest.mark.parametrize("name", ["qwen3vl-2b", "qwen3vl-8b", "qwen3vl-30b-a3b", "qwen3vl-tiny", "qwen3vl-moe-tiny"])
def test_round_trip_keeps_the_model(name):
    model = presets.get(name)
    back = model_config_from_hf(hf_config_from_model(model))
    strip = lambda m: dataclasses.replace(m, preset=None, init="layout_invariant")  # noqa: E731
    assert strip(back) == strip(model)


def test_v4_rope_scaling_and_num_local_experts_are_read():
    hf = hf_config_from_model(presets.get("qwen3vl-30b-a3b"))
    text = hf["text_config"]
    theta = text["rope_parameters"]["rope_theta"]
    text["rope_scaling"] = {"mrope_section": [24, 20, 20], "mrope_interleaved": True, "rope_type": "default"}
    text["rope_theta"] = theta
    del text["rope_parameters"]
    text["num_local_experts"] = text.pop("num_experts")
    model = model_config_from_hf(hf)
    assert model.language.rope_theta == theta and model.language.moe.num_experts == 128


def test_errors_name_the_key():
    hf = hf_config_from_model(presets.get("qwen3vl-tiny"))
    del hf["vision_config"]["depth"]
    with pytest.raises(HFConfigError, match="vision_config: missing key 'depth'"):
        model_config_from_hf(hf)
    with pytest.raises(HFConfigError, match="model_type 'llava'"):
        model_config_from_hf({"model_type": "llava"})
