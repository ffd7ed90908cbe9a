"""megavlm's VLMModel equals HF transformers' Qwen3-VL (dense and MoE) at TP=1 (fp32, CPU).

TP=2 and PP=2 are checked against the same HF logits in tests/parallel (worker scenarios
``vlm_logits_*``). Tolerance: 1e-4 max abs on the logits of every non-padding position.
"""

from __future__ import annotations

import json

import pytest
import torch
from megatron.core.utils import unwrap_model

from megavlm.conversion.engine import hf_to_megavlm, megavlm_to_hf
from megavlm.conversion.hf_checkpoint import load_hf_model_dir, save_hf_model_dir
from megavlm.conversion.qwen3vl import qwen3vl_rules
from megavlm.inference.hf_inputs import InputsError, forward_logits, read_hf_inputs
from megavlm.models.full_tensors import load_full_tensors
from megavlm.models.build import build_model_chunks
from tests.parity.qwen3vl_case import CASES, hf_logits, hf_model, processor_inputs, tiny_config

pytestmark = pytest.mark.usefixtures("single_rank_megatron")
LOGITS_TOL = 1e-4


@pytest.fixture(scope="module", params=["qwen3vl-tiny", "qwen3vl-moe-tiny"])
def pair(request):
    cfg = tiny_config(request.param)
    hf = hf_model(cfg)
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk).eval()
    load_full_tensors([model], hf_to_megavlm(hf.state_dict(), qwen3vl_rules(cfg.model), num_layers=cfg.model.language.num_layers))
    return cfg, hf, model


def test_parameter_count_and_round_trip(pair):
    cfg, hf, model = pair
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    rules = qwen3vl_rules(cfg.model)
    full = hf_to_megavlm(hf.state_dict(), rules, num_layers=cfg.model.language.num_layers)
    back = megavlm_to_hf(full, rules, num_layers=cfg.model.language.num_layers)
    expected = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not cfg.model.language.tie_embeddings}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) for k, v in expected.items())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(pair, case, tmp_path):
    cfg, hf, model = pair
    inputs = processor_inputs(cfg, CASES[case])
    torch.save(inputs, tmp_path / "inputs.pt")
    ours = forward_logits([model], read_hf_inputs(tmp_path / "inputs.pt", cfg.model), cfg.model)
    ref = hf_logits(hf, inputs)
    keep = inputs["attention_mask"].bool()
    assert (ours[keep] - ref[keep]).abs().max().item() <= LOGITS_TOL


def test_export_loads_in_transformers_and_reimports(pair, tmp_path):
    cfg, hf, model = pair
    import transformers

    full = hf_to_megavlm(hf.state_dict(), qwen3vl_rules(cfg.model), num_layers=cfg.model.language.num_layers)
    save_hf_model_dir(tmp_path, cfg.model, full)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(hf)
    reloaded_sd = reloaded.state_dict()
    assert all(torch.equal(reloaded_sd[k], v) for k, v in hf.state_dict().items())
    model_cfg, back = load_hf_model_dir(tmp_path)
    assert model_cfg.language == cfg.model.language and model_cfg.vision == cfg.model.vision
    assert all(torch.equal(back[k], full[k]) for k in full)


@pytest.mark.parametrize("pair", ["qwen3vl-moe-tiny"], indirect=True)
def test_moe_released_layout_is_transposed_on_import(pair, tmp_path):
    """Released checkpoints (written by transformers 4) store experts transposed. In the tiny
    model gate_up is square (H == 2I), so the version decides; down_proj is decided by shape."""
    cfg, hf, model = pair
    full = hf_to_megavlm(hf.state_dict(), qwen3vl_rules(cfg.model), num_layers=cfg.model.language.num_layers)
    save_hf_model_dir(tmp_path, cfg.model, full)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    released = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()}
    save_file(released, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "transformers_version": "4.57.0"}))
    _, back = load_hf_model_dir(tmp_path)
    assert all(torch.equal(back[k], full[k]) for k in full)


def test_inputs_errors_name_the_problem(pair, tmp_path):
    cfg, _, _ = pair
    inputs = processor_inputs(cfg, CASES["image"])
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 8]])
    torch.save(inputs, tmp_path / "bad.pt")
    with pytest.raises(InputsError, match="image_grid_thw implies 32 patches but pixel_values has 24"):
        read_hf_inputs(tmp_path / "bad.pt", cfg.model)
    inputs = processor_inputs(cfg, CASES["image"])
    inputs["mm_token_type_ids"][0, 0] = 1
    torch.save(inputs, tmp_path / "bad.pt")
    with pytest.raises(InputsError, match="row 0, position 0"):
        read_hf_inputs(tmp_path / "bad.pt", cfg.model)
