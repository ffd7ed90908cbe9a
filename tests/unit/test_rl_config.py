"""The PPO recipes load and validate; rl rules name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from megavlm.config import ConfigError, load_config
from megavlm.config.validate import validate_rl

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("recipe,world", [("examples/tiny/ppo.yaml", 1), ("examples/step3vl_10b/ppo_rlvr.yaml", 128),
                                          ("examples/step3vl_10b/ppo_rlhf.yaml", 128)])
def test_recipes_validate(recipe, world):
    cfg = load_config(REPO / recipe)
    validate_rl(cfg, world)
    assert cfg.train.global_batch_size == cfg.rl.prompts_per_iter * cfg.rl.rollouts_per_prompt


def test_rl_errors_name_the_key():
    base = ["model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal", "train.global_batch_size=32",
            "rl.prompts_per_iter=8", "rl.rollouts_per_prompt=4"]
    validate_rl(load_config(None, base), 2)
    with pytest.raises(ConfigError, match="data.dataset='synthetic_text': PPO needs prompts with targets"):
        validate_rl(load_config(None, base + ["data.dataset=synthetic_text"]), 1)
    validate_rl(load_config(None, base + ["parallel.cp=2"]), 2)  # CP: rollouts decode whole rows per CP rank
    with pytest.raises(ConfigError, match="parallel.vpp=2: PPO rollouts run one model chunk per rank"):
        validate_rl(load_config(None, base + ["parallel.pp=2", "parallel.vpp=2"]), 2)
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(16\) must equal rl.prompts_per_iter"):
        validate_rl(load_config(None, base + ["train.global_batch_size=16"]), 1)
    with pytest.raises(ConfigError, match="rl.advantage: 'ppo' is not one of gae, grpo"):
        validate_rl(load_config(None, base + ["rl.advantage=ppo"]), 1)
    with pytest.raises(ConfigError, match=r"rl.prompts_per_iter \(8\) must be a multiple of the data-parallel x context-parallel size \(3\)"):
        validate_rl(load_config(None, base[:-1] + ["rl.rollouts_per_prompt=3", "train.global_batch_size=24"]), 3)
    with pytest.raises(ConfigError, match="rl.judge"):
        validate_rl(load_config(None, base + ["rl.rewards=[{name: judge}]"]), 1)
    with pytest.raises(ConfigError, match="tie_embeddings=true needs parallel.pp=1"):
        validate_rl(load_config(None, base + ["model.language.tie_embeddings=true", "parallel.pp=2"]), 2)
