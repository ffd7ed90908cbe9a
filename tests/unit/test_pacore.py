"""PaCoRe (REFERENCE 8): template, compaction, ordering, schedule, batching across problems and
rounds, context budget, metrics, and the training data side, against hand-built cases."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from megavlm.config import ConfigError, load_config, validate
from megavlm.data.chat_template import Qwen3VLChatTemplate
from megavlm.data.encode import SampleEncoder
from megavlm.data.sample import Media, Message, Sample
from megavlm.data.tokenizer import synthetic_tokenizer
from megavlm.inference.engine import Completion, SamplingParams
from megavlm.rl.pacore import (
    PromptBuilder, answer_reward, compact, majority_answer, order_references, pacore_metrics, render_synthesis_prompt,
    round_schedule, run_pacore, synthesis_sample, vote_metrics,
)
from megavlm.rl.pacore_train import (
    MessagePool, PaCoReTrainingData, build_message_pools, stage1_filter, stage2_filter, synthesis_accuracy,
)

# Copied from REFERENCE 8 (the text inside the code fence).
REFERENCE_TEMPLATE = """You are given a problem and a list of reference responses. Your job is to analyze these references and provide your own response.

Original Problem:
{{ original_prompt }}

Reference Responses:
{% for response in ref_responses %}
Reference {{ loop.index }}:
{{ response }}
{% endfor %}

Now, based on the original problem and reference responses above, please provide your own comprehensive solution."""


def test_synthesis_prompt_is_byte_exact():
    from megavlm.rl.pacore import SYNTHESIS_TEMPLATE

    assert SYNTHESIS_TEMPLATE == REFERENCE_TEMPLATE
    # expanded by hand: each loop pass emits "\nReference i:\n<response>\n", endfor is
    # followed by "\n\nNow, ..."; nothing is escaped
    expected = (
        "You are given a problem and a list of reference responses. Your job is to analyze these references "
        "and provide your own response.\n\nOriginal Problem:\nWhat is 2 < 3 & 4?\n\nReference Responses:\n"
        "\nReference 1:\nyes <b>\n"
        "\nReference 2:\nno\n\nreally\n"
        "\n\nNow, based on the original problem and reference responses above, please provide your own "
        "comprehensive solution."
    )
    assert render_synthesis_prompt("What is 2 < 3 & 4?", ["yes <b>", "no\n\nreally"]) == expected


def test_compaction():
    assert compact("<think>a</think>\n\nThe answer is 3.") == "The answer is 3."
    assert compact("<think>a</think> x </think>\nfinal") == "final"  # after the LAST </think>
    assert compact("  no thinking here \n") == "no thinking here"  # none: the whole text
    assert compact("<think>unfinished") == "<think>unfinished"
    assert compact("done</think>") == ""


def test_reference_order_is_by_length_then_a_fixed_shuffle():
    texts = ["ccc", "a", "bb", "dddd", "b"]
    got = order_references(texts, seed=0)
    assert sorted(got) == sorted(texts)
    for _ in range(5):  # the completion order of the rollouts does not matter
        assert order_references(random.sample(texts, len(texts)), seed=0) == got
    assert got == ["bb", "b", "a", "dddd", "ccc"]  # pinned: sorted [a, b, bb, ccc, dddd], Random(0).shuffle
    assert order_references(texts, seed=1) != got


def test_round_schedule_presets():
    assert round_schedule("low") == [4, 1]
    assert round_schedule("medium") == [16, 1]
    assert round_schedule("high") == [32, 4, 1]
    assert round_schedule("custom", [8, 2]) == [8, 2, 1]
    with pytest.raises(ValueError, match="pacore.effort"):
        round_schedule("extreme")


def test_config_rules_name_the_key():
    cfg = load_config(None, ["model.preset=qwen3-tiny", "pacore.effort=custom", "pacore.rounds=[8,2]"])
    validate(cfg, 1)
    with pytest.raises(ConfigError, match="pacore.rounds"):
        validate(load_config(None, ["model.preset=qwen3-tiny", "pacore.rounds=[8]"]), 1)
    with pytest.raises(ConfigError, match="min_messages"):
        validate(load_config(None, ["model.preset=qwen3-tiny", "pacore.min_messages=30"]), 1)
    with pytest.raises(ConfigError, match="pacore.context_budget"):
        validate(load_config(None, ["model.preset=qwen3-tiny", "pacore.context_budget=100000"]), 1)


def test_recipes_are_valid_overrides():
    from pathlib import Path

    from megavlm.rl.pacore_cli import recipe_overrides

    root = Path(__file__).parents[2] / "examples"
    for effort, rounds in [("low", [4, 1]), ("medium", [16, 1]), ("high", [32, 4, 1])]:
        cfg = load_config(None, ["model.preset=step3vl-10b", *recipe_overrides(root / f"step3vl_10b/pacore_{effort}.yaml")])
        validate(cfg, 8)
        assert round_schedule(cfg.pacore.effort, cfg.pacore.rounds) == rounds
    validate(load_config(root / "tiny/pacore_counting.yaml"), 1)
    from megavlm.config.validate import validate_rl

    validate_rl(load_config(root / "tiny/pacore_train.yaml"), 1)
    validate_rl(load_config(root / "step3vl_10b/pacore_train.yaml"), 128)


def test_pacore_training_config_rules_name_the_key():
    from megavlm.config.validate import validate_rl

    base = ["model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal", "rl.prompt_source=pacore",
            "rl.mini_batches=1", "train.global_batch_size=32", "train.iters=4"]
    validate_rl(load_config(None, base), 1)
    for bad, key in [(["rl.prompt_source=pacor"], "rl.prompt_source"),
                     (["rl.mini_batches=2"], "rl.mini_batches"),  # strict on-policy
                     (["pacore.stage1_iters=4"], "pacore.stage1_iters"), (["pacore.problems=0"], "pacore.problems"),
                     (["rl.rewards=[{name: verifiable}, {name: format, weight: 0.1}]"], "rl.rewards"),
                     (["data.dataset=synthetic_text"], "data.dataset")]:
        with pytest.raises(ConfigError, match=key):
            validate_rl(load_config(None, base + bad), 1)


def test_answer_reward_and_vote():
    assert answer_reward("<think>maybe 2</think>There are 3 red shapes.", {"answer": "3"}) == 1.0
    assert answer_reward("2", {"answer": "3"}) == 0.0
    assert answer_reward("Cat.", {"answer": "cat"}) == 1.0
    assert answer_reward("3", None) is None and answer_reward("3", {"box": [1, 2, 3, 4]}) is None
    assert majority_answer(["1", "2", "two: 2", "1"]) == "1"  # tie 1 vs 2: seen first


# --- the rounds, with a scripted engine -----------------------------------------------------
TOK = synthetic_tokenizer()
IM_END = TOK.token_id("<|im_end|>")


def _encoder() -> SampleEncoder:
    return SampleEncoder(Qwen3VLChatTemplate(TOK), min_pixels=4096, max_pixels=16384, max_length=4096)


def _problem(i: int, image: bool = False) -> Sample:
    media = [Media("image", array=np.full((64, 64, 3), 40 * i, dtype=np.uint8))] if image else []
    parts = [{"type": "image", "index": 0}] if image else []
    parts.append({"type": "text", "text": f"How many red shapes? ({i})"})
    return Sample(id=f"p{i}", media=media, targets={"answer": str(i)},
                  messages=[Message("system", [{"type": "text", "text": "Count."}]), Message("user", parts),
                            Message("assistant", [{"type": "text", "text": str(i)}])])


class ScriptedEngine:
    """Records what each call is given; answers the prompt containing "(i)": round 0 with
    ``first[i][j]`` for its j-th rollout, synthesis rounds with ``synth_answer(i, j)``."""

    def __init__(self, first: dict[int, list[str]], synth_answer=lambda i, j: f"answer {i}"):
        self.first, self.synth_answer = first, synth_answer
        self.calls, self.seen = [], {}

    def rollout(self, prompts, params):
        out, call = [], []
        for prompt in prompts:
            text = TOK.decode(prompt.tokens.tolist())
            i = int(text.rsplit("(", 1)[1].split(")")[0])
            synth = "Reference Responses" in text
            j = self.seen.setdefault((i, synth), 0)
            self.seen[(i, synth)] += 1
            call.append((i, "synth" if synth else "orig"))
            answer = self.synth_answer(i, j) if synth else self.first[i][j]
            ids = torch.tensor(TOK.encode(answer) + [IM_END])
            out.append(Completion(tokens=ids, logprobs=torch.zeros(len(ids)), finish_reason="stop"))
        self.calls.append((call, params.seed))
        return out


def _params() -> SamplingParams:
    return SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, stop_token_ids=[IM_END])


def test_rounds_batch_across_problems_and_rounds():
    first = {0: ["<think>x</think>a 0", "bb 1"], 1: ["1", "c 1"], 2: ["2", "9"]}
    engine = ScriptedEngine(first)
    builder = PromptBuilder(_encoder(), context_budget=4096, max_new_tokens=8)
    samples = [_problem(0), _problem(1), _problem(2, image=True)]
    traces = run_pacore(engine, builder, samples, [2, 1], _params(), max_batch_size=4, shuffle_seed=3)
    # hand-built: call 0 takes p0 and p1's first round; their synthesis rounds queue behind p2's
    # first round, so call 1 mixes rounds; call n is seeded 5 + n
    assert engine.calls == [
        ([(0, "orig"), (0, "orig"), (1, "orig"), (1, "orig")], 5),
        ([(2, "orig"), (2, "orig"), (0, "synth"), (1, "synth")], 6),
        ([(2, "synth")], 7),
    ]
    t0 = traces[0]
    assert t0.rounds[0].responses == first[0] and t0.rounds[0].compacted == ["a 0", "bb 1"]
    assert t0.rounds[0].rewards == [1.0, 0.0] and t0.rounds[0].finished == [True, True]
    assert t0.answer == "answer 0" and t0.reward == 1.0
    # the synthesis prompt: the system message kept, the user message replaced (text joined)
    refs = order_references(["a 0", "bb 1"], 3)
    expected = Sample(id="p0", messages=[Message("system", [{"type": "text", "text": "Count."}]),
                                         Message("user", [{"type": "text", "text": render_synthesis_prompt(
                                             "How many red shapes? (0)", refs)}])])
    want, _ = _encoder().prompt(expected)
    got, _ = builder.synthesis(samples[0], refs)
    assert torch.equal(got.tokens, want)
    assert t0.rounds[1].prompt_tokens == want.numel()
    # the image stays attached to the synthesis prompt, before its text
    orig = builder.original(samples[2])
    synth, _ = builder.synthesis(samples[2], ["2", "9"])
    assert torch.equal(synth.pixel_values, orig.pixel_values) and torch.equal(synth.image_grid_thw, orig.image_grid_thw)
    assert synthesis_sample(samples[2], ["2"]).messages[1].content[0] == {"type": "image", "index": 0}

    m = pacore_metrics(traces)
    assert m["accuracy_per_round"] == [4 / 6, 1.0]  # p0 1 of 2, p1 2 of 2, p2 1 of 2; then all right
    assert m["emergent_cases"] == 0


def test_metrics_emergent_correctness_and_reference_mentions():
    # p0's references are all wrong and its synthesis is right: emergent; p1 not
    first = {0: ["5", "7"], 1: ["1", "3"]}
    answers = {0: "Reference 2 is wrong; it is 0", 1: "3"}
    engine = ScriptedEngine(first, synth_answer=lambda i, j: answers[i])
    builder = PromptBuilder(_encoder(), context_budget=4096, max_new_tokens=8)
    traces = run_pacore(engine, builder, [_problem(0), _problem(1)], [2, 1], _params(), max_batch_size=8)
    m = pacore_metrics(traces)
    assert m["accuracy_per_round"] == [0.25, 0.5]
    assert m["accuracy"] == 0.5
    assert (m["emergent_correct"], m["emergent_cases"], m["emergent_rate"]) == (1, 1, 1.0)
    assert m["reference_mention_rate"] == 0.5
    # majority vote over a one-round schedule
    votes = run_pacore(ScriptedEngine({0: ["0", "1", "0"], 1: ["2", "2", "1"]}), builder,
                       [_problem(0), _problem(1)], [3], _params(), max_batch_size=8)
    assert vote_metrics(votes) == {"rollouts": 3, "single_pass": 3 / 6, "majority_vote": 0.5}


def test_context_budget_cuts_every_reference_to_its_end():
    sample = _problem(1)
    encoder = _encoder()
    refs = ["one two three four five six seven eight nine ten 1", "short 2", "eleven twelve thirteen fourteen 3"]
    full, _ = encoder.prompt(synthesis_sample(sample, refs))
    budget = full.numel() - 10 + 8  # ten tokens too many with max_new_tokens=8
    builder = PromptBuilder(encoder, context_budget=budget, max_new_tokens=8)
    prompt, cap = builder.synthesis(sample, refs)
    assert cap is not None and prompt.tokens.numel() <= budget - 8

    def cut(c):  # the stated rule, written from the docstring: the last c tokens of each
        return [TOK.decode(TOK.encode(r)[-c:]) if len(TOK.encode(r)) > c else r for r in refs]

    def length(c):
        return encoder.prompt(synthesis_sample(sample, cut(c)))[0].numel()

    assert length(cap) <= budget - 8 < length(cap + 1)  # c is the largest that fits
    assert torch.equal(prompt.tokens, encoder.prompt(synthesis_sample(sample, cut(cap)))[0])
    assert cut(cap)[1] == "short 2" and cut(cap)[0].endswith("ten 1")  # short ones whole, ends kept
    with pytest.raises(ValueError, match="empty references"):
        PromptBuilder(encoder, context_budget=full.numel() - 60, max_new_tokens=8).synthesis(sample, refs)


# --- training data --------------------------------------------------------------------------
def test_message_pools_filtrations_and_synthesis_draws():
    answers = {0: ["0"] * 24, 1: ["1"] * 3 + ["9"] * 21, 2: ["9"] * 24, 3: ["3"] * 9 + ["9"] * 15}
    builder = PromptBuilder(_encoder(), context_budget=4096, max_new_tokens=8)
    samples = [_problem(i) for i in range(4)]
    pools = build_message_pools(ScriptedEngine(answers), builder, samples, _params(), pool_size=24, max_batch_size=40)
    assert [p.accuracy for p in pools] == [1.0, 3 / 24, 0.0, 9 / 24]
    kept = stage1_filter(pools)  # 0 < acc < 9/24: only p1 (9/24 itself is excluded)
    assert [p.sample.id for p in kept] == ["p1"]

    data = PaCoReTrainingData(pools, builder, min_messages=16, max_messages=24, seed=1)
    draws = data.draw(step=0, n=8) + data.draw(step=1, n=8)
    assert sorted(d.pool.sample.id for d in draws[:4]) == ["p0", "p1", "p2", "p3"]  # an epoch visits each once
    sizes = [len(d.messages) for d in draws]
    assert all(16 <= s <= 24 for s in sizes) and len(set(sizes)) > 1
    assert all(len(set(d.messages)) == len(d.messages) for d in draws)  # without replacement
    assert [d.messages for d in data.draw(step=1, n=8)] == [d.messages for d in draws[8:]]  # pure function
    d = draws[0]
    text = TOK.decode(d.prompt.tokens.tolist())
    assert len(re.findall(r"\nReference \d+:\n", text)) == len(d.messages)
    assert data.reward(d, f"it is {d.pool.sample.targets['answer']}") == 1.0 and data.reward(d, "9") == 0.0

    engine = ScriptedEngine(answers, synth_answer=lambda i, j: str(i) if (i == 3 or j % 2) else "9")
    acc = synthesis_accuracy(engine, data, _params(), rollouts=4, max_batch_size=16)
    assert acc == [0.5, 0.5, 0.5, 1.0]
    assert [p.sample.id for p in stage2_filter(data.pools, acc)] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError, match="no verifiable target"):
        build_message_pools(ScriptedEngine({5: ["1"]}), builder,
                            [Sample(id="x", messages=[Message("user", [{"type": "text", "text": "(5)"}])])],
                            _params(), pool_size=1, max_batch_size=1)
    assert isinstance(pools[0], MessagePool)


# --- the real engine ------------------------------------------------------------------------
@pytest.mark.usefixtures("single_rank_megatron")
def test_counting_problems_through_the_generation_engine(tmp_path):
    """tools/pacore.py's library path on a tiny random Qwen3-VL: images decoded from the
    JSONL's files ride along into the synthesis round; traces and baselines are written."""
    import json

    from megatron.core.utils import unwrap_model

    from megavlm.models.build import build_model_chunks
    from megavlm.rl.pacore_cli import run_file, write_counting_problems

    write_counting_problems(tmp_path / "p.jsonl", 3, seed=99)
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.min_pixels=4096", "data.max_pixels=16384",
                             "pacore.effort=custom", "pacore.rounds=[2]", "pacore.max_new_tokens=3",
                             "pacore.context_budget=512", "pacore.max_batch_size=4"])
    (chunk,), _ = build_model_chunks(cfg)
    metrics = run_file(cfg, [unwrap_model(chunk)], str(tmp_path / "p.jsonl"), str(tmp_path / "out.jsonl"),
                       compare=True)
    traces = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [t["id"] for t in traces] == [f"synthetic-99-{i}-count" for i in range(3)]
    for t in traces:
        first, final = t["rounds"]
        assert (first["k"], final["k"], len(first["responses"]), len(final["responses"])) == (2, 1, 2, 1)
        assert final["prompt_tokens"] > first["prompt_tokens"] + 200  # the synthesis template
        assert t["answer"] == final["compacted"][0] and t["reward"] in (0.0, 1.0)
    assert metrics["schedule"] == [2, 1] and len(metrics["accuracy_per_round"]) == 2
    assert metrics["baselines"]["rollouts"] == 3


def test_stage1_from_the_config():
    from megavlm.rl.pacore_train import stage1_training_data

    cfg = load_config(None, ["model.preset=qwen3-tiny", "pacore.pool_size=8", "pacore.min_messages=4",
                             "pacore.max_messages=6", "pacore.stage1_max_accuracy=0.5", "pacore.max_batch_size=5"])
    answers = {0: ["0"] * 8, 1: ["1"] * 3 + ["9"] * 5, 2: ["9"] * 8, 3: ["3"] * 4 + ["9"] * 4}
    builder = PromptBuilder(_encoder(), context_budget=4096, max_new_tokens=8)
    engine = ScriptedEngine(answers)
    data, pools = stage1_training_data(cfg.pacore, engine, builder, [_problem(i) for i in range(4)], _params())
    assert [len(p.responses) for p in pools] == [8] * 4
    assert max(len(call) for call, _ in engine.calls) == 5
    assert [p.sample.id for p in data.pools] == ["p1"]  # 0 < 3/8 < 0.5; 4/8 is not below 0.5
    assert all(4 <= len(d.messages) <= 6 for d in data.draw(0, 6))
