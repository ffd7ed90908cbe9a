"""The megavlm Qwen3 decoder equals HF transformers' Qwen3ForCausalLM (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers
from megatron.core.utils import unwrap_model

from megavlm.config import load_config
from megavlm.conversion.engine import hf_to_megavlm, megavlm_to_hf
from megavlm.conversion.qwen3 import qwen3_rules
from megavlm.models.full_tensors import load_full_tensors
from megavlm.models.build import build_model_chunks

pytestmark = pytest.mark.usefixtures("single_rank_megatron")
LOGITS_TOL = 1e-4


def _hf_model(lm, tie: bool) -> transformers.Qwen3ForCausalLM:
    config = transformers.Qwen3Config(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups, head_dim=lm.head_dim, rms_norm_eps=lm.norm_eps,
        rope_theta=lm.rope_theta, max_position_embeddings=lm.max_position_embeddings,
        tie_word_embeddings=tie, attention_bias=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # HF leaves norms at 1; randomize them so QK-norm is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_param_count_match_hf(tie):
    cfg = load_config(None, ["model.preset=qwen3-tiny", f"model.language.tie_embeddings={str(tie).lower()}"])
    lm = cfg.model.language
    hf = _hf_model(lm, tie)
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk).eval()

    hf_params = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in model.parameters()) == hf_params

    rules = qwen3_rules(lm)
    full = hf_to_megavlm(hf.state_dict(), rules, num_layers=lm.num_layers)
    load_full_tensors([model], full)
    back = megavlm_to_hf(full, rules, num_layers=lm.num_layers)  # the round trip is bit-exact
    assert back.keys() == hf.state_dict().keys() - ({"lm_head.weight"} if tie else set())
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items() if k in back)

    tokens = torch.randint(0, lm.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ours = model(tokens, positions)  # [b, s, vocab]
        ref = hf(input_ids=tokens).logits
    assert (ours - ref).abs().max().item() <= LOGITS_TOL
