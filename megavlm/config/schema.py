"""Typed configuration of a megavlm run: one kw-only dataclass per component.

Field names are the user-facing keys (``parallel.tp``, ``train.lr``, ...); YAML files and
dotted CLI overrides address them directly. Cross-field rules live in ``validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megavlm.config.vision import ProjectorConfig, RopeConfig, TokenIdsConfig, VisionConfig
from megavlm.config.lr import LRPhase


@dataclass(kw_only=True)
class MoEConfig:
    """Qwen3-MoE feed-forward: softmax router, top-k with renormalization, aux loss."""

    num_experts: int
    topk: int
    ffn_hidden_size: int  # per expert
    aux_loss_coeff: float = 1e-3
    # "alltoall" scales with EP; "allgather" is simpler and good for small EP.
    dispatcher: str = "alltoall"
    grouped_gemm: bool = False  # TE grouped GEMM (GPU only)
    # Every MoE layer by default; a list of 0/1 per layer for mixed dense/MoE stacks.
    layer_freq: int | list[int] = 1


def moe_layer_pattern(num_layers: int, layer_freq: int | list[int] | None) -> list[int]:
    """1 for a MoE layer, 0 for a dense one; ``layer_freq`` None means a dense model."""
    if layer_freq is None:
        return [0] * num_layers
    if isinstance(layer_freq, int):
        return [1 if i % layer_freq == 0 else 0 for i in range(num_layers)]
    return list(layer_freq)


@dataclass(kw_only=True)
class LanguageModelConfig:
    """A Qwen3 decoder: RMSNorm, QK-norm, GQA, SwiGLU, RoPE."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    norm_eps: float = 1e-6
    qk_norm: bool = True
    tie_embeddings: bool = False
    moe: MoEConfig | None = None


@dataclass(kw_only=True)
class FP8Config:
    """Transformer Engine FP8 (GPU only), passed through to megatron-core."""

    format: str | None = None  # None (off), "hybrid" or "e4m3"
    recipe: str = "delayed"  # "delayed", "tensorwise" or "mxfp8"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    param: bool = False  # keep parameters in FP8


@dataclass(kw_only=True)
class ModelConfig:
    # Name of a preset in megavlm.config.presets; other model keys override its fields.
    preset: str | None = None
    language: LanguageModelConfig | None = None
    init_std: float = 0.02
    # "layout_invariant": every TP/PP/EP layout gets the same full weights for a seed.
    # "megatron": megatron-core's own per-rank initialization (faster for huge models).
    init: str = "layout_invariant"
    # Layer implementation: "auto" is Transformer Engine on a CUDA machine (an error there if
    # TE does not import) and megatron's local layers without CUDA; "local" on a GPU is an
    # explicit choice (no FP8); "transformer_engine" insists on TE.
    transformer_impl: str = "auto"
    fp8: FP8Config = field(default_factory=FP8Config)
    # A VLM when set: vision encoder -> projector -> placeholders in the decoder's input.
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(kind="rope"))
    token_ids: TokenIdsConfig = field(default_factory=TokenIdsConfig)
    # Parts whose parameters do not train: any of "vision", "projector", "language"
    # (Qwen3-VL stage 0 freezes vision and language and trains the projector only).
    freeze: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel degrees; data parallelism is whatever the world size leaves over."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallelism; defaults to tp
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    # Context parallelism (cp > 1): how K/V travel between CP ranks. Transformer Engine takes
    # p2p (ring), a2a (Ulysses-style head exchange), a2a+p2p (hierarchical) and all_gather;
    # megavlm's own ring attention (no TE, e.g. CPU) takes p2p.
    cp_comm_type: str = "p2p"
    # Spread the vision encoder's images and frames over the CP ranks and all-gather the
    # features, instead of every CP rank encoding all media of the micro-batch.
    vision_cp_split: bool = False
    # Overlap of data-parallel communication with compute (megatron-core DDP): gradient
    # reduce-scatter/all-reduce with the backward, parameter all-gather (distributed optimizer
    # only) with the next forward. None: on with CUDA (param gather: with the distributed
    # optimizer too), off on CPU.
    overlap_grad_reduce: bool | None = None
    overlap_param_gather: bool | None = None
    # TP all-gather / reduce-scatter overlapped with the GEMMs of the decoder (Transformer
    # Engine userbuffers; needs tp > 1 and sequence_parallel).
    tp_comm_overlap: bool = False
    # Uneven pipeline split: decoder layers on the first / last stage (the first stage also
    # carries the vision encoder); the other stages split the rest evenly. None: even split.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    # Collective timeout of the process group; a hung collective fails naming the rank.
    timeout_minutes: float = 30.0


@dataclass(kw_only=True)
class DataConfig:
    # "synthetic_text": token sequences generated by the repo (no download needed);
    # "synthetic_multimodal": drawn images and videos with exact answers (megavlm.data.synthetic);
    # "shards": a folder written by tools/prepare_data.py, at data.path.
    # "webdataset": existing webdataset tars at data.path (plain, or Megatron-Energon-prepared
    # with .nv-meta/: its train split), in megavlm's seeded order (megavlm.data.webdataset).
    dataset: str = "synthetic_text"
    path: str | None = None
    # The split of a Megatron-Energon-prepared data.path to train on (train, val or test of
    # its .nv-meta/split.yaml). Evaluation without eval.data.path reads its "val" split.
    split: str = "train"
    # tokenizer.json (HF) or .model (sentencepiece) of the model; None: the synthetic one.
    tokenizer: str | None = None
    # Bad samples (corrupt media, too long, ...) are skipped and counted; above this fraction
    # of the samples seen (after 100) the run stops with examples.
    max_bad_fraction: float = 0.01
    # Loader worker processes (decode and pack ahead of the step); 0: in the training process.
    num_workers: int = 0
    seq_length: int = 128
    seed: int = 1234
    # Pack several samples per sequence (needs train.micro_batch_size=1).
    pack: bool = False
    # Packing counts each sample as its length rounded up to this multiple; None: 2 x parallel.cp
    # (context parallelism pads every packed sample to it). Set it to compare layouts on
    # identical rows.
    pack_align: int | None = None
    # Synthetic data only: draw sample lengths from [min_sample_length, seq_length]; 0: full.
    min_sample_length: int = 0
    # Qwen3-VL dynamic resolution: images are resized into [min_pixels, max_pixels] (sides
    # multiples of 32); defaults are the released preprocessor_config.json's.
    min_pixels: int = 65536
    max_pixels: int = 16777216
    # Encoded images (files, bytes): "dali" (NVIDIA DALI, mixed GPU decoding in a CUDA training
    # process, CPU operators otherwise; Pillow takes what DALI cannot, counted) or "pillow".
    image_decoder: str = "dali"
    # Encoded videos: "dali" (DALI's decoder for the codecs it has, NVDEC on a GPU; PyAV for the
    # rest, counted) or "pyav" (FFmpeg for every video: the frames HF's own video loaders give,
    # where DALI's YUV -> RGB conversion differs by a few levels, more at sharp chroma edges).
    video_decoder: str = "dali"
    # Threads of each DALI decoder (one per training process or loader worker).
    decode_threads: int = 2
    # Qwen3-VL chat template: "instruct" (Qwen3-VL-*-Instruct) or "thinking" (Qwen3-VL-*-Thinking:
    # <think> blocks on the answers after the last user turn, generation prompt ends "<think>\n").
    chat_template: str = "instruct"


@dataclass(kw_only=True)
class RecomputeConfig:
    """Activation recomputation (megatron-core's): trade compute for activation memory."""

    # None: off; "selective": recompute the core attention (megatron's default module list);
    # "full": recompute whole decoder layers (method and num_layers say which).
    granularity: str | None = None
    # With granularity "full": "uniform" (checkpoint groups of num_layers layers) or "block"
    # (recompute the first num_layers layers of each pipeline stage).
    method: str = "uniform"
    num_layers: int = 1


@dataclass(kw_only=True)
class TrainConfig:
    iters: int = 100
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 8
    lr: float = 3e-4
    warmup_iters: int = 0
    # With no phases: one cosine/linear decay from lr to min_lr over the whole run.
    lr_decay: str = "cosine"
    min_lr: float = 0.0
    lr_phases: list[LRPhase] = field(default_factory=list)
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # "auto": bf16 on GPU, fp32 on CPU.
    precision: str = "auto"
    # Weight of each supervised token, normalized over the global batch: "per_token" (1),
    # "per_sample" (1/N_i) or "sqrt" (1/sqrt(N_i)), N_i the supervised tokens of sample i.
    loss_normalization: str = "per_token"
    # Project to the vocabulary and compute the cross entropy only at supervised positions
    # (loss mask non-zero): prompt, image and padding tokens never get logits. Same loss and
    # gradients; less compute and far less logit memory ([tokens, vocab / tp] in fp32).
    # Pretraining, SFT and evaluation; PPO computes its log-probs from a pass of its own.
    supervised_logits_only: bool = True
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    # Save and exit cleanly after every N-th iteration (0: off), or once the run has
    # trained this many minutes (0: off); resume with checkpoint.load as after a SIGTERM.
    exit_interval: int = 0
    exit_duration_mins: float = 0.0
    # torch.compile every transformer layer (decoder and ViT): megavlm.training.compile.
    compile: bool = False
    # CUDA graphs of the decoder layers, megatron-core's ``cuda_graph_impl``: None (off) or
    # "local" (megatron's CudaGraphManager, captured after cuda_graph_warmup_steps steps);
    # cuda_graph_scope: [] for whole layers, or some of attn, mlp, moe, moe_router, moe_preprocess.
    cuda_graph: str | None = None
    cuda_graph_scope: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class CheckpointConfig:
    save: str | None = None
    # Resume: the newest complete checkpoint here (weights, optimizer, iteration, data position).
    # It wins over ``pretrained`` when one exists (the requeue pattern).
    load: str | None = None
    # Fine-tune: only the weights of an HF model directory or a megavlm checkpoint, into any
    # layout, with a fresh optimizer, iteration 0 and a fresh data position. The architecture
    # (and, unless data.tokenizer is set, the tokenizer) comes from there.
    pretrained: str | None = None
    interval: int = 0  # 0: only at the end (and on SIGTERM/SIGUSR1)
    async_save: bool = False
    # Resume from the previous complete checkpoint when the newest one's files do not match
    # the checksums in its marker (the error names the damaged files either way).
    fallback: bool = False
    # Keep only the newest N complete checkpoints under checkpoint.save; 0: keep all.
    keep_last: int = 0


@dataclass(kw_only=True)
class LoggingConfig:
    dir: str = "runs/default"
    interval: int = 1
    tensorboard: bool = True
    # Also log to Weights & Biases under this project (needs `pip install wandb`); None: off.
    wandb_project: str | None = None


@dataclass(kw_only=True)
class EvalDataConfig:
    # A folder of shards written by tools/prepare_data.py, or of webdataset tars (plain or
    # Energon-prepared: its train split); None: a held-out split (below).
    path: str | None = None


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out loss every ``interval`` iterations over ``iters`` global batches (0: off)."""

    interval: int = 0
    iters: int = 1
    # Without eval.data.path, synthetic data is drawn with this seed: samples the training
    # run (data.seed) never sees. data.dataset=shards needs eval.data.path; webdataset needs
    # it too, unless data.path is Energon-prepared with a "val" split (then that is read).
    seed: int = 987654
    data: EvalDataConfig = field(default_factory=EvalDataConfig)


@dataclass(kw_only=True)
class RewardTerm:
    """One reward term of ``rl.rewards`` (megavlm.rl.rewards.REGISTRY names)."""

    name: str
    weight: float = 1.0


@dataclass(kw_only=True)
class RLConfig:
    """PPO (tools/train_ppo.py, REFERENCE 7). The actor trains at train.lr with train's
    schedule; one iteration = P prompts x K rollouts, then rl.mini_batches optimizer steps
    of each model. train.iters counts iterations; train.global_batch_size must be P x K."""

    advantage: str = "gae"  # "gae" (actor + critic) or "grpo" (critic-free, group-normalized)
    prompts_per_iter: int = 8  # P
    rollouts_per_prompt: int = 4  # K
    mini_batches: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    critic_lr: float = 5e-6
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = False
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # asymmetric upper clip; None: clip_eps
    dual_clip: float | None = 3.0  # bound -c*A for A < 0; None: off
    value_clip_eps: float | None = 0.2  # None: unclipped value loss
    tis_cap: float = 8.0  # C of the truncated importance weights
    kl_coef: float = 0.0  # KL to the initial policy (k3); 0: no reference model is built
    entropy_coef: float = 0.0
    # Keep only prompts whose K rollouts have 0 < pass rate < 1 (reward > pass_threshold).
    difficulty_filter: bool = True
    pass_threshold: float = 0.5
    # Critic weights: a megavlm checkpoint with a value head; None: the actor's weights.
    critic_pretrained: str | None = None
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm(name="verifiable")])
    point_scale: float = 100.0  # point reward: 1 - distance / scale (0..1000 coordinates)
    # Generative reward model (reward name "judge"): a megavlm checkpoint prompted as judge.
    judge: str | None = None
    judge_mode: str = "pointwise"  # "pointwise" or "pairwise" (against the group's first rollout)
    # Synthetic tasks the prompts come from (data.dataset=synthetic_multimodal).
    tasks: list[str] = field(default_factory=lambda: ["count"])
    eval_prompts: int = 0  # held-out prompts scored greedily every logging.interval; 0: none
    # "dataset": the prompts of data.dataset; "pacore": PaCoRe synthesis prompts built from the
    # actor's message pools over data.dataset's first pacore.problems problems (pacore.*,
    # REFERENCE 8; strict on-policy: needs rl.mini_batches=1).
    prompt_source: str = "dataset"


@dataclass(kw_only=True)
class PaCoReConfig:
    """PaCoRe test-time scaling and its training data (REFERENCE 8; megavlm.rl.pacore)."""

    # Parallel rollouts per round before the final single answer: low [4], medium [16],
    # high [32, 4]; "custom" takes ``rounds``.
    effort: str = "medium"
    rounds: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    # Prompt + max_new_tokens must fit here (0: model.language.max_position_embeddings); the
    # references of a synthesis prompt are cut to their last c tokens, c as large as fits.
    context_budget: int = 0
    shuffle_seed: int = 0  # order of the references shown in a synthesis prompt
    seed: int = 0  # sampling
    max_batch_size: int = 64  # rollouts per engine call, across problems and rounds
    # Training (message pool and filtrations)
    pool_size: int = 24
    min_messages: int = 16
    max_messages: int = 24
    stage1_max_accuracy: float = 0.375  # keep 0 < message accuracy < 9/24
    # PPO on synthesis prompts (rl.prompt_source=pacore; sampling and length from rl.*):
    problems: int = 64  # data.dataset's first N problems get message pools
    # Iterations on the stage-1 problems; then the actor (the stage-1 checkpoint) measures
    # each one's synthesis accuracy over stage2_rollouts prompts and 0 < accuracy < 1 stay.
    # None: stage 1 throughout.
    stage1_iters: int | None = None
    stage2_rollouts: int = 8


@dataclass(kw_only=True)
class InferenceConfig:
    """KV-cache generation (``megavlm.inference.engine``) in tools/generate.py, tools/pacore.py,
    PPO rollouts (with rl.prompt_source=pacore too) and the generative judge. The trainer's
    few sample answers at the end of pretraining stay eager (a compilation would cost more than
    they take)."""

    # torch.compile the one-token decoding step (the prompt's prefill stays eager): 2.6-3.9x
    # the eager engine's tokens/s on the tiny CPU bench (bench/rollout_throughput.py), after
    # two compilations per process (one static, then one with the cache length dynamic),
    # 10-40 s together on 2 CPU cores.
    compile_decode: bool = False


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    pacore: PaCoReConfig = field(default_factory=PaCoReConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
