"""Cross-field rules, checked before any process group starts.

Every message names the key(s), the values and what to change, because a rule broken at
scale is otherwise discovered as an opaque assert minutes into a multi-node launch.
"""

from __future__ import annotations

from megavlm.config.loader import ConfigError
from megavlm.config.schema import Config

_CHOICES = {
    "model.init": ("layout_invariant", "megatron"),
    "model.transformer_impl": ("auto", "transformer_engine", "local"),
    "model.fp8.format": (None, "hybrid", "e4m3"),
    "model.fp8.recipe": ("delayed", "tensorwise", "mxfp8"),
    "train.lr_decay": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "fp32", "bf16"),
    "data.dataset": ("synthetic_text", "synthetic_multimodal", "shards", "webdataset"),
    "data.image_decoder": ("dali", "pillow"),
    "data.video_decoder": ("dali", "pyav"),
    "data.split": ("train", "val", "test"),
    "data.chat_template": ("instruct", "thinking"),
    "model.rope.kind": ("rope", "mrope_interleaved", "mrope_chunked"),
    "train.loss_normalization": ("per_token", "per_sample", "sqrt"),
    "parallel.cp_comm_type": ("p2p", "a2a", "a2a+p2p", "all_gather"),
    "train.recompute.granularity": (None, "selective", "full"),
    "train.recompute.method": ("uniform", "block"),
    "train.cuda_graph": (None, "local"),
}
_VISION_CHOICES = {
    "kind": ("qwen3vl", "pe"),
    "activation": ("gelu_tanh", "gelu", "quick_gelu"),
}
_FREEZABLE = ("vision", "projector", "language")


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _context_parallel_errors(cfg: Config) -> list[str]:
    """The rules of context parallelism (megavlm.parallel; REFERENCE 10)."""
    p = cfg.parallel
    if p.cp == 1:
        return ["parallel.vision_cp_split=true needs parallel.cp > 1"] if p.vision_cp_split else []
    from megavlm.platform.device import use_transformer_engine

    errors = []
    align = cfg.data.pack_align
    if cfg.data.pack and align is not None and align % (2 * p.cp):
        errors.append(f"data.pack_align ({align}) must be a multiple of 2 x parallel.cp ({2 * p.cp})")
    step = 2 * p.cp * (p.tp if p.sequence_parallel else 1)
    if cfg.data.seq_length % step:
        errors.append(
            f"data.seq_length ({cfg.data.seq_length}) must be a multiple of 2 x parallel.cp"
            + (" x parallel.tp (sequence parallelism)" if p.sequence_parallel else "")
            + f" = {step}: every CP rank holds two equal chunks of each sequence (load balance)"
        )
    lm = cfg.model.language
    if p.cp_comm_type in ("a2a", "a2a+p2p") and (lm.num_attention_heads // p.tp) % p.cp:
        errors.append(
            f"parallel.cp_comm_type={p.cp_comm_type} exchanges attention heads: the heads per TP rank "
            f"({lm.num_attention_heads // p.tp}) must be a multiple of parallel.cp ({p.cp})"
        )
    if p.vision_cp_split and cfg.model.vision is None:
        errors.append("parallel.vision_cp_split=true needs a vision encoder (model.vision)")
    try:
        te = use_transformer_engine(cfg.model.transformer_impl)
    except Exception:  # the transformer_impl error itself is reported by its own check
        return errors
    if not te:
        if p.cp_comm_type != "p2p":
            errors.append(
                f"parallel.cp_comm_type={p.cp_comm_type} needs Transformer Engine attention; without TE "
                "megavlm's ring attention runs parallel.cp_comm_type=p2p"
            )
        if cfg.model.rope.kind != "mrope_interleaved":
            errors.append(
                f"parallel.cp={p.cp} with model.rope.kind={cfg.model.rope.kind} needs Transformer Engine: "
                "megatron-core's rotary modules slice positions per CP rank on CUDA only; without TE, "
                "context parallelism runs models with mrope_interleaved (per-token frequencies)"
            )
    return errors


def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tp * p.pp * p.cp)


def validate(cfg: Config, world_size: int) -> None:
    """Raise ConfigError on the first broken rule."""
    errors = _collect_errors(cfg, world_size)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _collect_errors(cfg: Config, world_size: int) -> list[str]:
    errors: list[str] = []
    p, t = cfg.parallel, cfg.train
    lm = cfg.model.language

    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            errors.append(f"{key}: {value!r} is not one of {shown}")
    errors += _pacore_errors(cfg)
    for i, phase in enumerate(t.lr_phases):
        if phase.decay not in _CHOICES["train.lr_decay"]:
            errors.append(f"train.lr_phases[{i}].decay: {phase.decay!r} is not one of cosine, linear, constant")

    for key in ("parallel.tp", "parallel.pp", "parallel.cp", "parallel.ep", "train.iters",
                "train.micro_batch_size", "train.global_batch_size", "data.seq_length"):
        if _get(cfg, key) < 1:
            errors.append(f"{key} must be >= 1, got {_get(cfg, key)}")
    if errors:
        return errors

    if lm is None:
        return errors + ["model: set model.preset (e.g. qwen3-tiny) or model.language"]

    etp = p.etp if p.etp is not None else p.tp
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        errors.append(
            f"world size {world_size} must equal parallel.tp x parallel.pp x parallel.cp x DP; "
            f"tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel} does not divide it"
        )
    if lm.num_attention_heads % p.tp:
        errors.append(
            f"model.language.num_attention_heads ({lm.num_attention_heads}) must be a multiple "
            f"of parallel.tp ({p.tp})"
        )
    if lm.num_query_groups % p.tp:
        errors.append(
            f"model.language.num_query_groups ({lm.num_query_groups}) must be a multiple of "
            f"parallel.tp ({p.tp}); lower parallel.tp"
        )
    if lm.num_attention_heads % lm.num_query_groups:
        errors.append(
            f"model.language.num_attention_heads ({lm.num_attention_heads}) must be a multiple "
            f"of model.language.num_query_groups ({lm.num_query_groups})"
        )
    if lm.vocab_size % p.tp:
        errors.append(
            f"model.language.vocab_size ({lm.vocab_size}) must be a multiple of parallel.tp ({p.tp}) "
            "(the embedding and output layer are split by vocabulary rows)"
        )
    vpp = p.vpp or 1
    if p.vpp is not None and p.vpp > 1 and p.pp < 2:
        errors.append(f"parallel.vpp={p.vpp} needs parallel.pp >= 2, got {p.pp}")
    uneven = _uneven_stage_errors(p, lm.num_layers)
    errors += uneven
    if p.first_stage_layers is None and p.last_stage_layers is None and lm.num_layers % (p.pp * vpp):
        errors.append(
            f"model.language.num_layers ({lm.num_layers}) must be a multiple of "
            f"parallel.pp x parallel.vpp ({p.pp} x {vpp} = {p.pp * vpp})"
        )
    errors += _context_parallel_errors(cfg)
    if p.sequence_parallel and p.tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    errors += _overlap_errors(cfg)
    errors += _cuda_graph_errors(cfg)
    if p.sequence_parallel and cfg.data.seq_length % p.tp:
        errors.append(
            f"data.seq_length ({cfg.data.seq_length}) must be a multiple of parallel.tp ({p.tp}) "
            "with sequence parallelism"
        )
    r = t.recompute
    if r.granularity == "full" and cfg.model.vision is not None and cfg.model.vision.deepstack_layers:
        # DeepStack adds visual features inside the decoder layers; megatron's full recompute
        # replays those additions in backward and would backpropagate into the vision graph twice
        errors.append(
            "train.recompute.granularity=full is not supported with DeepStack (model.vision.deepstack_layers); "
            "use train.recompute.granularity=selective"
        )
    if r.num_layers < 1:
        errors.append(f"train.recompute.num_layers must be >= 1, got {r.num_layers}")
    elif r.granularity == "full" and r.method == "uniform" and lm.num_layers // (p.pp * vpp) % r.num_layers:
        errors.append(
            f"train.recompute.num_layers ({r.num_layers}) must divide the layers of each pipeline "
            f"chunk ({lm.num_layers // (p.pp * vpp)}) with method uniform"
        )

    if lm.moe is None:
        if p.ep > 1:
            errors.append(f"parallel.ep={p.ep} needs a MoE model (model.language.moe)")
    else:
        if lm.moe.num_experts % p.ep:
            errors.append(
                f"model.language.moe.num_experts ({lm.moe.num_experts}) must be a multiple of "
                f"parallel.ep ({p.ep})"
            )
        if lm.moe.topk > lm.moe.num_experts:
            errors.append(
                f"model.language.moe.topk ({lm.moe.topk}) must be <= num_experts ({lm.moe.num_experts})"
            )
        if lm.moe.dispatcher not in ("alltoall", "allgather"):
            errors.append(f"model.language.moe.dispatcher: {lm.moe.dispatcher!r} is not one of alltoall, allgather")
        if world_size % (etp * p.ep * p.pp):
            errors.append(
                f"world size {world_size} must be a multiple of parallel.etp x parallel.ep x "
                f"parallel.pp ({etp} x {p.ep} x {p.pp})"
            )
        if p.tp > 1 and p.ep > 1 and not p.sequence_parallel:
            errors.append("parallel.ep > 1 with parallel.tp > 1 needs parallel.sequence_parallel=true")

    errors += _vlm_errors(cfg)
    if errors:
        return errors
    dp = data_parallel_size(cfg, world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x DP ({t.micro_batch_size} x {dp}); DP = world size "
            f"{world_size} / (tp*pp*cp)"
        )
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if not errors and p.vpp and p.vpp > 1 and num_microbatches % p.pp:
        errors.append(
            f"parallel.vpp={p.vpp} (interleaved pipeline) needs the number of micro-batches "
            f"({num_microbatches} = global / (micro x DP)) to be a multiple of parallel.pp ({p.pp})"
        )
    if t.lr_phases and sum(ph.iters for ph in t.lr_phases) + t.warmup_iters > t.iters:
        errors.append(
            f"train.warmup_iters + sum(train.lr_phases[*].iters) exceeds train.iters ({t.iters})"
        )
    if cfg.model.fp8.format is not None and cfg.model.transformer_impl == "local":
        errors.append("model.fp8.format needs Transformer Engine layers; model.transformer_impl=local has none")
    if cfg.model.fp8.format is not None:
        errors += _fp8_shape_errors(cfg)
        from megavlm.platform.device import fp8_support

        supported, why = fp8_support(cfg.model.fp8.recipe)
        if not supported:
            errors.append(f"model.fp8.format={cfg.model.fp8.format!r}: {why}; set model.fp8.format=null")
    if cfg.data.dataset == "shards" and not cfg.data.path:
        errors.append("data.dataset=shards needs data.path (a folder written by tools/prepare_data.py)")
    if cfg.data.dataset == "webdataset":
        errors += _webdataset_errors(cfg.data.path)
    webdataset_split = cfg.data.dataset == "webdataset" and energon_has_split(cfg.data.path, cfg.data.split)
    if cfg.data.split != "train" and not webdataset_split:
        errors.append(f"data.split={cfg.data.split} needs data.dataset=webdataset on a Megatron-Energon-prepared "
                      f"data.path whose .nv-meta/split.yaml has a non-empty {cfg.data.split!r} split")
    if cfg.data.num_workers < 0:
        errors.append(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.decode_threads < 1:
        errors.append(f"data.decode_threads must be >= 1, got {cfg.data.decode_threads}")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        errors.append(f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.data.pack and t.micro_batch_size != 1:
        errors.append(f"data.pack=true needs train.micro_batch_size=1, got {t.micro_batch_size}")
    if not 0 <= cfg.data.min_sample_length <= cfg.data.seq_length:
        errors.append(
            f"data.min_sample_length ({cfg.data.min_sample_length}) must be in [0, data.seq_length={cfg.data.seq_length}]"
        )
    if cfg.checkpoint.interval < 0:
        errors.append(f"checkpoint.interval must be >= 0, got {cfg.checkpoint.interval}")
    for key in ("train.exit_interval", "train.exit_duration_mins"):
        if _get(cfg, key) < 0:
            errors.append(f"{key} must be >= 0 (0: off), got {_get(cfg, key)}")
    if not p.timeout_minutes > 0:
        errors.append(f"parallel.timeout_minutes must be > 0, got {p.timeout_minutes}")
    if cfg.eval.interval < 0 or cfg.eval.iters < 1:
        errors.append(f"eval.interval must be >= 0 (0: off) and eval.iters >= 1, got {cfg.eval.interval}, {cfg.eval.iters}")
    energon_val = cfg.data.dataset == "webdataset" and energon_has_split(cfg.data.path, "val")
    if cfg.eval.interval and cfg.data.dataset in ("shards", "webdataset") and not cfg.eval.data.path and not energon_val:
        errors.append(f"eval.interval with data.dataset={cfg.data.dataset} needs eval.data.path (a held-out folder written by "
                      "tools/prepare_data.py, or webdataset tars), or an Energon-prepared data.path with a 'val' "
                      "split; a seed gives no held-out split of fixed shards")
    if cfg.eval.interval and cfg.eval.seed == cfg.data.seed and not cfg.eval.data.path:
        errors.append(f"eval.seed equals data.seed ({cfg.data.seed}): the eval samples would be training samples")
    if cfg.checkpoint.keep_last < 0:
        errors.append(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {cfg.checkpoint.keep_last}")
    if cfg.checkpoint.async_save and not cfg.checkpoint.save:
        errors.append("checkpoint.async_save=true needs checkpoint.save (the directory to write to); set it or drop async_save")
    if cfg.data.seq_length > lm.max_position_embeddings:
        errors.append(
            f"data.seq_length ({cfg.data.seq_length}) exceeds model.language.max_position_embeddings "
            f"({lm.max_position_embeddings})"
        )
    return errors


def energon_has_split(path: str | None, split: str) -> bool:
    """Whether ``path`` is Energon-prepared and its split.yaml lists shards for ``split``."""
    from pathlib import Path

    import yaml

    split_file = Path(path or "") / ".nv-meta" / "split.yaml"
    if not path or not split_file.is_file():
        return False
    try:
        parts = (yaml.safe_load(split_file.read_text()) or {}).get("split_parts") or {}
    except yaml.YAMLError:
        return False  # named by _webdataset_errors' reader when the data is opened
    return bool(parts.get(split))


def _webdataset_errors(path: str | None) -> list[str]:
    """data.dataset=webdataset: data.path is a folder of .tar shards or an Energon-prepared one."""
    from pathlib import Path

    what = "a folder of webdataset .tar shards, or a Megatron-Energon-prepared folder with .nv-meta/"
    if not path:
        return [f"data.dataset=webdataset needs data.path ({what})"]
    root = Path(path)
    if not root.is_dir():
        return [f"data.path={path} is not a folder; data.dataset=webdataset needs {what}"]
    if (root / ".nv-meta").is_dir():
        meta = root / ".nv-meta"
        missing = [n for n in ("split.yaml", ".info.json|.info.yaml")
                   if not any((meta / alt).is_file() for alt in n.split("|"))]
        if missing:
            return [f"data.path={path}: .nv-meta/ lacks {' and '.join(missing)}; run `energon prepare {path}`"]
        return []
    if next(root.rglob("*.tar"), None) is None:
        return [f"data.path={path} holds no .tar file and no .nv-meta/; data.dataset=webdataset needs {what}"]
    return []


def _vlm_errors(cfg: Config) -> list[str]:
    """Vision encoder, projector, DeepStack, MRoPE and freezing rules."""
    m, p = cfg.model, cfg.parallel
    lm, v = m.language, m.vision
    errors = []
    if m.rope.kind.startswith("mrope") and sum(m.rope.mrope_section) != lm.head_dim // 2:
        errors.append(
            f"model.rope.mrope_section {m.rope.mrope_section} must sum to model.language.head_dim / 2 "
            f"({lm.head_dim // 2}): one entry per rotary frequency"
        )
    for part in m.freeze:
        if part not in _FREEZABLE:
            errors.append(f"model.freeze: {part!r} is not one of {', '.join(_FREEZABLE)}")
    if v is None:
        if cfg.data.dataset in ("synthetic_multimodal", "shards", "webdataset"):
            errors.append(f"data.dataset={cfg.data.dataset} needs a VLM: set model.preset (e.g. qwen3vl-tiny) or model.vision")
        return errors
    for key, choices in _VISION_CHOICES.items():
        if getattr(v, key) not in choices:
            errors.append(f"model.vision.{key}: {getattr(v, key)!r} is not one of {', '.join(choices)}")
    if m.projector is None or m.projector.kind not in ("patch_merger", "conv_downsample"):
        errors.append("model.projector.kind must be patch_merger (Qwen3-VL) or conv_downsample (STEP3-VL)")
    if v.num_attention_heads % p.tp:
        errors.append(
            f"model.vision.num_attention_heads ({v.num_attention_heads}) must be a multiple of parallel.tp ({p.tp})"
        )
    if v.hidden_size % v.num_attention_heads or (v.hidden_size // v.num_attention_heads) % 4:
        errors.append(
            f"model.vision.hidden_size ({v.hidden_size}) / num_attention_heads ({v.num_attention_heads}) "
            "must be a multiple of 4 (2D RoPE splits each head between rows and columns)"
        )
    bad = [i for i in v.deepstack_layers if not 0 <= i < v.num_layers]
    if bad:
        errors.append(f"model.vision.deepstack_layers {bad} are not ViT blocks 0..{v.num_layers - 1}")
    if len(v.deepstack_layers) > lm.num_layers:
        errors.append(
            f"model.vision.deepstack_layers has {len(v.deepstack_layers)} levels but the decoder has only "
            f"{lm.num_layers} layers (level i is added after decoder layer i)"
        )
    if set(m.freeze) >= set(_FREEZABLE):
        errors.append(f"model.freeze={m.freeze} freezes every parameter; nothing would train")
    return errors


def _fp8_shape_errors(cfg: Config) -> list[str]:
    """TE's FP8 GEMMs need every per-rank GEMM dimension to be a multiple of 16."""
    lm, p = cfg.model.language, cfg.parallel
    etp = p.etp if p.etp is not None else p.tp
    dims = {
        "model.language.hidden_size": lm.hidden_size,
        "model.language.ffn_hidden_size / parallel.tp": lm.ffn_hidden_size // p.tp,
        "model.language.num_attention_heads x head_dim / parallel.tp": lm.num_attention_heads * lm.head_dim // p.tp,
    }
    if lm.moe is not None:
        dims["model.language.moe.ffn_hidden_size / parallel.etp"] = lm.moe.ffn_hidden_size // etp
    return [f"model.fp8: {name} = {value} must be a multiple of 16 for FP8 GEMMs"
            for name, value in dims.items() if value % 16]


def validate_rl(cfg: Config, world_size: int) -> None:
    """The ``rl`` section's rules (PPO runs only), on top of ``validate``."""
    validate(cfg, world_size)
    r, t, p = cfg.rl, cfg.train, cfg.parallel
    errors = []
    for key, choices in {"advantage": ("gae", "grpo"), "judge_mode": ("pointwise", "pairwise")}.items():
        if getattr(r, key) not in choices:
            errors.append(f"rl.{key}: {getattr(r, key)!r} is not one of {', '.join(choices)}")
    for key in ("prompts_per_iter", "rollouts_per_prompt", "mini_batches", "max_new_tokens"):
        if getattr(r, key) < 1:
            errors.append(f"rl.{key} must be >= 1, got {getattr(r, key)}")
    rollouts = r.prompts_per_iter * r.rollouts_per_prompt
    if t.global_batch_size != rollouts:
        errors.append(f"train.global_batch_size ({t.global_batch_size}) must equal rl.prompts_per_iter x "
                      f"rl.rollouts_per_prompt ({r.prompts_per_iter} x {r.rollouts_per_prompt} = {rollouts}): "
                      "the rollouts of one iteration are its global batch")
    dp = data_parallel_size(cfg, world_size) * p.cp
    if r.prompts_per_iter % dp:
        errors.append(f"rl.prompts_per_iter ({r.prompts_per_iter}) must be a multiple of the data-parallel x "
                      f"context-parallel size ({dp}): each of those ranks generates rollouts for its own prompts")
    if r.advantage == "grpo" and r.rollouts_per_prompt < 2:
        errors.append("rl.advantage=grpo needs rl.rollouts_per_prompt >= 2 (advantages are normalized per group)")
    if r.tis_cap <= 1:
        errors.append(f"rl.tis_cap ({r.tis_cap}) must be > 1")
    if r.dual_clip is not None and r.dual_clip <= 1:
        errors.append(f"rl.dual_clip ({r.dual_clip}) must be > 1 (or null: off)")
    if r.temperature < 0:
        errors.append(f"rl.temperature must be >= 0, got {r.temperature}")
    if any(term.name == "judge" for term in r.rewards) and not r.judge:
        errors.append("rl.rewards has a 'judge' term but rl.judge (the judge model's checkpoint) is not set")
    if r.advantage == "gae" and cfg.model.language.tie_embeddings and p.pp > 1:
        errors.append("the critic replaces the output layer with a value head, which cannot share the embedding "
                      "across pipeline stages: model.language.tie_embeddings=true needs parallel.pp=1 "
                      "(or rl.advantage=grpo)")
    if p.vpp and p.vpp > 1:
        errors.append(f"parallel.vpp={p.vpp}: PPO rollouts run one model chunk per rank (the KV-cache engine); "
                      "unset parallel.vpp (parallel.pp alone is supported)")
    if cfg.data.dataset not in ("synthetic_multimodal", "shards", "webdataset"):
        errors.append(f"data.dataset={cfg.data.dataset!r}: PPO needs prompts with targets "
                      "(synthetic_multimodal, shards or webdataset: megavlm.rl.prompt_data)")
    errors += _pacore_training_errors(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _pacore_training_errors(cfg: Config) -> list[str]:
    """rl.prompt_source=pacore: strict on-policy PPO on synthesis prompts (REFERENCE 8)."""
    r, c = cfg.rl, cfg.pacore
    if r.prompt_source not in ("dataset", "pacore"):
        return [f"rl.prompt_source: {r.prompt_source!r} is not one of dataset, pacore"]
    if r.prompt_source != "pacore":
        return []
    errors = []
    if r.mini_batches != 1:
        errors.append(f"rl.prompt_source=pacore is strict on-policy: rl.mini_batches must be 1 (one optimizer "
                      f"step per iteration, on rollouts of the weights it updates), got {r.mini_batches}")
    for key in ("problems", "stage2_rollouts"):
        if getattr(c, key) < 1:
            errors.append(f"pacore.{key} must be >= 1, got {getattr(c, key)}")
    if c.stage1_iters is not None and not 1 <= c.stage1_iters < cfg.train.iters:
        errors.append(f"pacore.stage1_iters ({c.stage1_iters}) must be in [1, train.iters) so that stage 2 "
                      f"runs (train.iters={cfg.train.iters}), or null: stage 1 throughout")
    bounded = ("verifiable", "math", "counting", "iou", "point", "format", "language")  # each in [0, 1]
    names = [t.name for t in r.rewards]
    if any(n not in bounded for n in names) or any(t.weight < 0 for t in r.rewards) \
            or sum(t.weight for t in r.rewards) > 1:
        errors.append(f"rl.rewards ({names}, weights {[t.weight for t in r.rewards]}): PaCoRe's terminal reward "
                      f"must lie in [0, 1]: terms from {', '.join(bounded)} with weights >= 0 summing to <= 1")
    if cfg.data.dataset not in ("synthetic_multimodal", "shards"):
        errors.append(f"data.dataset={cfg.data.dataset!r}: PaCoRe training needs problems with targets "
                      "(synthetic_multimodal or shards)")
    return errors


def _pacore_errors(cfg: Config) -> list[str]:
    c = cfg.pacore
    errors = []
    if c.effort not in ("low", "medium", "high", "custom"):
        errors.append(f"pacore.effort: {c.effort!r} is not one of low, medium, high, custom")
    elif (c.effort == "custom") != bool(c.rounds):
        errors.append(f"pacore.rounds ({c.rounds}) is set exactly when pacore.effort=custom (got {c.effort!r})")
    if any(k < 1 for k in c.rounds):
        errors.append(f"pacore.rounds: every round needs >= 1 rollout, got {c.rounds}")
    for key in ("max_new_tokens", "max_batch_size", "pool_size", "min_messages"):
        if getattr(c, key) < 1:
            errors.append(f"pacore.{key} must be >= 1, got {getattr(c, key)}")
    if not c.min_messages <= c.max_messages <= c.pool_size:
        errors.append(f"pacore: need min_messages ({c.min_messages}) <= max_messages ({c.max_messages}) "
                      f"<= pool_size ({c.pool_size})")
    if c.context_budget < 0:
        errors.append(f"pacore.context_budget must be >= 0 (0: the model's positions), got {c.context_budget}")
    lm = cfg.model.language
    if lm is not None and c.context_budget > lm.max_position_embeddings:
        errors.append(f"pacore.context_budget ({c.context_budget}) exceeds model.language.max_position_embeddings "
                      f"({lm.max_position_embeddings})")
    if not 0 < c.stage1_max_accuracy <= 1:
        errors.append(f"pacore.stage1_max_accuracy must be in (0, 1], got {c.stage1_max_accuracy}")
    return errors


def _uneven_stage_errors(p, num_layers: int) -> list[str]:
    """parallel.first_stage_layers / last_stage_layers: megatron-core's uneven split rules."""
    set_keys = {k: v for k, v in (("first_stage_layers", p.first_stage_layers),
                                  ("last_stage_layers", p.last_stage_layers)) if v is not None}
    if not set_keys:
        return []
    errors = []
    if p.pp < 2:
        errors.append(f"parallel.{next(iter(set_keys))} needs parallel.pp >= 2, got {p.pp}")
    if p.vpp is not None and p.vpp > 1:
        errors.append("parallel.first_stage_layers / last_stage_layers are not supported with parallel.vpp > 1")
    for key, value in set_keys.items():
        if value < 1:
            errors.append(f"parallel.{key} must be >= 1, got {value}")
    if errors:
        return errors
    rest_layers = num_layers - sum(set_keys.values())
    rest_stages = p.pp - len(set_keys)
    if rest_layers < rest_stages or (rest_stages == 0 and rest_layers) or (rest_stages and rest_layers % rest_stages):
        errors.append(
            f"parallel.first_stage_layers / last_stage_layers ({p.first_stage_layers} / {p.last_stage_layers}) "
            f"leave {rest_layers} of model.language.num_layers ({num_layers}) for the other {rest_stages} "
            f"pipeline stage(s); that must be a positive multiple of their count"
        )
    return errors


_GRAPH_SCOPES = ("attn", "mlp", "moe", "moe_router", "moe_preprocess")


def _cuda_graph_errors(cfg: Config) -> list[str]:
    """train.cuda_graph / cuda_graph_scope: what megatron-core 0.16.1 accepts for layer graphs
    (TransformerConfig.__post_init__), checked before any process group starts."""
    t, errors = cfg.train, []
    if t.cuda_graph is None:
        return ["train.cuda_graph_scope needs train.cuda_graph=local"] if t.cuda_graph_scope else []
    from megavlm.platform.device import has_cuda, has_transformer_engine

    if not (has_cuda() and has_transformer_engine()):
        errors.append(f"train.cuda_graph={t.cuda_graph} needs CUDA and Transformer Engine (megatron-core's "
                      "graph capture uses TE's graph-safe RNG tracker)")
    bad = [s for s in t.cuda_graph_scope if s not in _GRAPH_SCOPES]
    if bad:
        errors.append(f"train.cuda_graph_scope: {bad} not among {', '.join(_GRAPH_SCOPES)} ([] captures whole "
                      "layers; megatron's full_iteration graph needs its own training loop wrapper)")
    moe = cfg.model.language.moe
    if moe is None and {"moe", "moe_router", "moe_preprocess"} & set(t.cuda_graph_scope):
        errors.append("train.cuda_graph_scope: moe, moe_router and moe_preprocess need a MoE model")
    if "moe_preprocess" in t.cuda_graph_scope and "moe_router" not in t.cuda_graph_scope:
        errors.append("train.cuda_graph_scope: moe_preprocess needs moe_router")
    if "moe" in t.cuda_graph_scope:
        errors.append("train.cuda_graph_scope: moe needs drop-and-pad MoE (expert capacity), which megavlm does not configure")
    if moe is not None and moe.layer_freq == 1 and "mlp" in t.cuda_graph_scope:
        errors.append("train.cuda_graph_scope: mlp graphs dense MLPs only, and every layer is MoE")
    if t.recompute.granularity == "full":
        errors.append("train.cuda_graph with train.recompute.granularity=full: megatron-core allows full "
                      "recompute only with a full-iteration graph; use selective")
    return errors


def _overlap_errors(cfg: Config) -> list[str]:
    """Communication-overlap keys (resolved defaults: megavlm.training.data_parallel)."""
    p, errors = cfg.parallel, []
    if p.overlap_param_gather and not p.distributed_optimizer:
        errors.append("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true")
    if p.tp_comm_overlap:
        from megavlm.platform.device import has_cuda, has_transformer_engine

        if p.tp < 2 or not p.sequence_parallel:
            errors.append("parallel.tp_comm_overlap=true needs parallel.tp > 1 and parallel.sequence_parallel=true")
        if not (has_cuda() and has_transformer_engine()):
            errors.append("parallel.tp_comm_overlap=true needs CUDA and Transformer Engine (userbuffers)")
        if cfg.model.transformer_impl == "local":
            errors.append("parallel.tp_comm_overlap=true needs Transformer Engine layers; model.transformer_impl=local has none")
    return errors

