"""KV-cache generation over VLMModel in its training layout (TP, PP, DP).

megatron-core's ``StaticInferenceContext`` keeps the keys and values of every layer; each
step feeds only the new tokens. Prompts of different lengths are left-padded to a common
end, and a boolean mask keeps every query off the padding keys, so all rows decode in
lockstep at one cache offset. MRoPE positions are explicit: each row's prompt gets its
``megavlm.positions`` ids, and generated token k of a row sits at ``prompt_len + k +
rope_delta`` on all three axes (REFERENCE 1). Keys enter the cache already rotated
(``keys_rotated_once``, the layout megatron's flash-decode path uses), so a decoding step
passes the positions of its new tokens only: the rotary table and RoPE cover those tokens,
not the whole sequence again.

``rollout`` returns each completion with the log-prob of every token (fp32, over the real
vocabulary, at the sampling temperature, before top-p): the rollout log-probs of RL.
Only the prompts' placeholders are media (``media_mask``): a generated ``<image_pad>`` is a
plain token, embedded and positioned as text.

Sampling is identical on every TP rank: the logits are gathered over the vocabulary and
the random draws come from one generator seeded the same everywhere.

Pipeline parallelism (``parallel.pp > 1``, one model chunk per rank): every step runs the
stages in turn, each with its own KV cache (its layers' keys and values); a stage receives
the previous stage's hidden states (with DeepStack's addends attached, as in training) from
its pipeline neighbour, and the last stage samples. The sampled tokens are broadcast over
the pipeline group, so every stage feeds the same next tokens and stops at the same step,
and the log-probs are broadcast at the end: every rank returns the same completions. This is
what lets PPO roll out with the actor in its training layout (colocated, no resharding).

Context parallelism (``parallel.cp > 1``): a decoding step feeds one token per row, which
cannot be split over CP ranks; CP ranks hold the same weights, so each decodes the whole
sequences itself with context parallelism lifted from the model for the rollout
(``context_parallel_off``): the CP ranks of a DP rank return the same completions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding, RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention, _yarn_get_concentration_factor_from_config
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import unwrap_model
from torch import Tensor

from megavlm.data.batch import concat_media
from megavlm.platform import cpu_adapter
from megavlm.positions import sample_position_ids


@dataclass
class Prompt:
    """One prompt: token ids and its media (flattened patches + grids, as in a Batch)."""

    tokens: Tensor  # [s] int64
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    pixel_values_videos: Tensor | None = None
    video_grid_thw: Tensor | None = None


@dataclass
class Completion:
    """One prompt's generated tokens, each with its log-probability (fp32) under
    ``log_softmax(logits / T)`` over the real vocabulary (T = temperature, 1 when greedy),
    taken before top-p truncation: what a policy-gradient importance ratio compares with."""

    tokens: Tensor  # [n] int64, the stop token included when one ended the row
    logprobs: Tensor  # [n] float32
    finish_reason: str  # "stop" | "length"


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int = 0


@contextlib.contextmanager
def sequence_parallel_off(model: torch.nn.Module):
    """Decoding feeds one token per row, which sequence parallelism cannot split across TP
    ranks; every module reads the flag it copied at construction, so flip them all."""
    saved = [(m, m.sequence_parallel) for m in model.modules() if isinstance(getattr(m, "sequence_parallel", None), bool)]
    config = model.config
    was = config.sequence_parallel
    for m, _ in saved:
        m.sequence_parallel = False
    config.sequence_parallel = False
    try:
        yield
    finally:
        config.sequence_parallel = was
        for m, flag in saved:
            m.sequence_parallel = flag


def padding_mask(pad: Tensor, start: int, end: int) -> Tensor:
    """``[b, 1, end - start, end]`` bool attention mask (True = masked out) for the queries at
    ``start..end`` of left/right-padded rows: padding keys and future keys are masked, except
    each position to itself, so a padding query never has an empty softmax row (NaN).
    ``pad``: ``[b, >= end]``. The mask is complete (causal too), so an attention that reads it
    *instead of* a causal mask (TE's ``arbitrary`` type) computes the same as one that adds it."""
    queries = torch.arange(start, end, device=pad.device)[:, None]  # [q, 1]
    keys = torch.arange(end, device=pad.device)[None, :]  # [1, end]
    mask = pad[:, None, None, :end] | (keys > queries)  # [b, 1, q, end]
    return mask & (keys != queries)


def te_mask_type(*, masked: bool, query_len: int, key_len: int) -> AttnMaskType:
    """The mask type Transformer Engine's attention must be given for one call.

    TE reads ``attention_mask`` only for padding-aware types: with ``causal`` (what megatron
    passes for a prompt) or ``no_mask`` (what it passes for every decoding step) a padded row
    would attend to its padding. TE's ``padding*`` types turn the mask into per-row lengths
    counted from the start of each row (``cu_seqlens``, right padding), while prompts here are
    left-padded; ``arbitrary`` applies the mask exactly as given, and ``padding_mask`` makes it
    complete (padding and causality). Without a mask the fast types stay: ``causal`` for a
    prompt, ``no_mask`` for one new token (it may see every cached key), bottom-right causal
    for several new tokens after a cache.
    """
    if masked:
        return AttnMaskType.arbitrary
    if query_len == key_len:
        return AttnMaskType.causal
    if query_len == 1:
        return AttnMaskType.no_mask
    return AttnMaskType.causal_bottom_right


@contextlib.contextmanager
def context_parallel_off(model: torch.nn.Module):
    """Lift context parallelism from ``model`` for a rollout: every CP rank then runs whole
    sequences (same weights, same inputs, same outputs). What reads the CP group at run time:

    * megavlm's SDPA attention (``cp_size``: ring attention when > 1);
    * Transformer Engine's attention (its CP group, set through TE's own
      ``set_context_parallel_group``, given back afterwards);
    * megatron's rotary tables, 1D and multimodal (``cp_group``: the table is cut to the
      rank's zigzag chunks); the 1D ``forward`` is an ``lru_cache`` keyed without the group,
      so it is cleared on the way in and out.
    """
    if parallel_state.get_context_parallel_world_size() == 1:
        yield
        return
    restore = []
    for m in model.modules():
        if hasattr(m, "set_context_parallel_group") and getattr(m, "cp_group", None) is not None:  # TE
            # TE's (cp_group, cp_global_ranks, cp_stream[, cp_comm_type]): the 4th argument
            # exists in TE versions whose attention has a cp_comm_type
            comm = (m.cp_comm_type,) if hasattr(m, "cp_comm_type") else ()
            saved = (m.cp_group, m.cp_global_ranks, m.cp_stream, *comm)
            m.set_context_parallel_group(None, None, None, *comm)
            restore.append(lambda m=m, saved=saved: m.set_context_parallel_group(*saved))
            continue
        if isinstance(getattr(m, "cp_size", None), int) and m.cp_size > 1:
            restore.append(lambda m=m, size=m.cp_size: setattr(m, "cp_size", size))
            m.cp_size = 1
        group = getattr(m, "cp_group", None)
        if isinstance(m, (RotaryEmbedding, MultimodalRotaryEmbedding)) and group is not None and group.size() > 1:
            restore.append(lambda m=m, group=group: setattr(m, "cp_group", group))
            m.cp_group = None
    RotaryEmbedding.forward.cache_clear()
    try:
        yield
    finally:
        for undo in restore:
            undo()
        RotaryEmbedding.forward.cache_clear()


def _te_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """megatron's ``TEDotProductAttention`` modules (they carry ``te_forward_mask_type``)."""
    return [m for m in model.modules() if hasattr(m, "te_forward_mask_type")]


@contextlib.contextmanager
def te_mask_types(model: torch.nn.Module):
    """Give every TE attention of ``model`` the mask type ``te_mask_type`` selects (TE only;
    megavlm's local attention applies a given mask on top of any type)."""
    attentions = _te_attentions(model)
    for attention in attentions:
        if not attention.te_forward_mask_type:
            raise RuntimeError("Transformer Engine >= 0.12 is needed to pass the attention mask type per call")
        original = attention.forward

        def forward(query, key, value, attention_mask, attn_mask_type=None, *args, _original=original, **kwargs):
            attn_mask_type = te_mask_type(masked=attention_mask is not None, query_len=query.shape[0],
                                          key_len=key.shape[0])
            return _original(query, key, value, attention_mask, attn_mask_type, *args, **kwargs)

        attention.forward = forward
    try:
        yield
    finally:
        for attention in attentions:
            del attention.forward


@contextlib.contextmanager
def keys_rotated_once(model: torch.nn.Module):
    """Store every new key in the KV cache with RoPE already applied, so no step rotates the
    cached keys again.

    megatron's static-batching path without flash decode caches keys unrotated and, every
    step, slices the rotary table to the whole sequence and rotates every cached key (O(total)
    work per step and layer, and a table over the whole sequence). Its flash-decode path
    caches rotated keys, but needs the CUDA flash-attention kernel. This gives megatron's
    attention the same cache layout with its own RoPE function: each call rotates its new
    keys with the rows of the table for its new tokens, stores them, and hands the query alone
    to the usual rotation. Rotating a key when it is stored or when it is read is the same
    elementwise product, so the attention is unchanged.

    The table the model computes may cover only the new tokens (MRoPE from the positions
    given, ``len == new tokens``) or the whole cache (1D RoPE, sliced by cache offset here).
    """
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    for attention in attentions:
        original = attention._adjust_key_value_for_inference

        def adjust(inference_context, query, key, value, rotary_pos_emb, *args, _original=original,
                   _attention=attention, **kwargs):
            if rotary_pos_emb is None or inference_context is None or not inference_context.is_static_batching():
                return _original(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
            q_emb, k_emb = rotary_pos_emb
            new = key.size(0)
            if k_emb.size(0) != new:  # a table over the whole cache: the rows of the new tokens
                start = inference_context.sequence_len_offset
                q_emb, k_emb = q_emb[start : start + new], k_emb[start : start + new]
            config = _attention.config
            key = apply_rotary_pos_emb(key, k_emb, config=config, mscale=_yarn_get_concentration_factor_from_config(config),
                                       cp_group=_attention.pg_collection.cp)
            query, key, value, _, mask_type, block_table = _original(inference_context, query, key, value, None,
                                                                     *args, **kwargs)
            return query, key, value, (q_emb, None), mask_type, block_table

        attention._adjust_key_value_for_inference = adjust
    try:
        yield
    finally:
        for attention in attentions:
            del attention._adjust_key_value_for_inference


def _sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """Next token per row from ``[b, vocab]`` float logits (the generator on their device)."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest nucleus
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stage_step(model: torch.nn.Module, received: Tensor | None, tokens: Tensor, positions: Tensor, **kwargs) -> Tensor:
    """One pipeline stage's forward: ``received`` (the previous stage's output; None on the
    first stage) becomes the model's input tensor. One function, so that a compiled decoding
    step takes the received hidden states as a graph input: megatron's block reads them from
    an attribute (``set_input_tensor``), which a graph compiled outside the setter does not
    take as an input (inductor rejected the next step's tensor)."""
    if received is not None:
        model.set_input_tensor(received)
    return model(tokens, positions, **kwargs)


# How many decoding steps run between two checks that every row has stopped: the check
# waits for the device, and a finished row only costs its share of a batched step.
STOP_CHECK_EVERY = 8


class _PipelineStage:
    """This rank's place in the pipeline during a rollout: receive the previous stage's
    output, send this stage's output, broadcast what the last stage decided. Point-to-point
    over the global ranks of the pipeline group, shape first (a stage's output carries its
    DeepStack addends, so its width is the model's business, not the engine's)."""

    def __init__(self):
        self.size = parallel_state.get_pipeline_model_parallel_world_size()
        self.first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if self.size > 1:
            self.group = parallel_state.get_pipeline_model_parallel_group()
            self.last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
            self.next = None if self.last else parallel_state.get_pipeline_model_parallel_next_rank()
            self.prev = None if self.first else parallel_state.get_pipeline_model_parallel_prev_rank()

    _DTYPES = (torch.float32, torch.bfloat16, torch.float16)

    def send(self, tensor: Tensor) -> None:
        header = [self._DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
        dist.send(torch.tensor(header + [0] * (8 - len(header)), device=tensor.device), self.next)
        dist.send(tensor.contiguous(), self.next)

    def recv(self, device: torch.device) -> Tensor:
        header = torch.zeros(8, dtype=torch.long, device=device)
        dist.recv(header, self.prev)
        dtype, dims = self._DTYPES[int(header[0])], header[2 : 2 + int(header[1])].tolist()
        tensor = torch.empty(dims, dtype=dtype, device=device)
        dist.recv(tensor, self.prev)
        return tensor

    def from_last(self, tensor: Tensor) -> Tensor:
        """``tensor`` as the last stage has it, on every stage (in place)."""
        if self.size > 1:
            dist.broadcast(tensor, self.last_rank, group=self.group)
        return tensor


class GenerationEngine:
    """Batched generation for VLMModel: one chunk per rank (``parallel.vpp`` unset).

    ``compile_decode`` (``inference.compile_decode``): the one-token decoding steps call the
    model through ``torch.compile``; the prompt's prefill (media, ViT, packed shapes) stays
    eager, as it runs once per rollout. Why the whole step and not each layer: at decode
    sizes the time goes to Python (megatron's module stack, its autograd functions even
    under ``no_grad``, the KV-cache bookkeeping), not to kernels, and one graph per step
    removes all of it; compiling layer by layer keeps the Python between layers and
    recompiles per ``layer_number`` (an int attribute dynamo keeps static). Shapes:
    dynamo's automatic dynamic shapes compile the first step with static shapes and the
    second with the cache length (the mask width and the cache slice) dynamic, after
    which every step and every later rollout of the same batch size reuses that graph. One
    graph break per step remains, at megatron's ``make_viewless_tensor`` (a ``.data``
    assignment) at the decoder's entry of a text-only model (the VLM's decoder input is never
    a view in generation). Pipeline stages call ``_stage_step``, so the received hidden states are a graph
    input (and never a view: ``models.viewless.block_input``). The compiled step is
    the same computation: greedy tokens are tested against full recomputation (and equal
    HF's ``generate`` in bench/rollout_throughput.py), sampled rollouts at TP=2 and PP=2
    against the eager single rank (tests/parallel/test_ppo.py). On GPUs the same call
    compiles Triton kernels; that path, and Transformer Engine layers under
    ``torch.compile``, have not been run here.
    """

    def __init__(self, model_chunks, *, pad_token_id: int = 0, compile_decode: bool = False):
        chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
        if len(chunks) > 1:
            raise ValueError(
                "GenerationEngine runs one model chunk per rank (parallel.vpp unset); reload the "
                "checkpoint without virtual pipeline stages (checkpoints reshard on load)"
            )
        self.model = unwrap_model(chunks)[0]
        self.stage = _PipelineStage()
        self.pad_token_id = pad_token_id
        cfg = self.model.model_cfg
        self.vocab_size = cfg.language.vocab_size
        self._decode_step = torch.compile(_stage_step, dynamic=None) if compile_decode else None

    def _forward(self, tokens: Tensor, positions: Tensor, *, decode: bool = False, **kwargs) -> Tensor:
        """This stage's part of one step (``decode``: a one-token decoding step): logits on the
        last stage, hidden states elsewhere."""
        stage = self.stage
        received = stage.recv(tokens.device) if stage.size > 1 and not stage.first else None
        if decode and self._decode_step is not None:
            output = self._decode_step(self.model, received, tokens, positions, **kwargs)
        else:
            # Layers compiled for training (train.compile: PPO's actor) run eager here: with an
            # inference context they would recompile per layer (megatron reads the int
            # ``layer_number``, which dynamo keeps static) up to dynamo's recompile limit.
            # What generation compiles is inference.compile_decode's business alone.
            with torch.compiler.set_stance("force_eager"):
                output = _stage_step(self.model, received, tokens, positions, **kwargs)
        if stage.size > 1 and not stage.last:
            stage.send(output)
        return output

    def _positions(self, prompts: list[Prompt], pad: list[int], total: int) -> Tensor:
        """``[3, b, total]`` (MRoPE) or ``[b, total]`` positions of every slot (left padding at 0)."""
        rows = []
        for prompt, p in zip(prompts, pad):
            ids = sample_position_ids(
                prompt.tokens, prompt.image_grid_thw, prompt.video_grid_thw, self.model.model_cfg,
                new_tokens=total - p - prompt.tokens.numel(),
            )  # [3, total - p] or [total - p]
            rows.append(torch.cat([ids.new_zeros(*ids.shape[:-1], p), ids], dim=-1))
        return torch.stack(rows, dim=-2)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Tensor]:
        """The generated tokens of each prompt (stop token included, if one was produced)."""
        return [c.tokens for c in self.rollout(prompts, params)]

    @torch.no_grad()
    def rollout(self, prompts: list[Prompt], params: SamplingParams) -> list[Completion]:
        """Each prompt's completion: tokens, their log-probs under the sampling distribution
        (before top-p) and why it ended. Only the prompts' placeholders are media: a generated
        ``<image_pad>`` is embedded and positioned as text."""
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        b, new = len(prompts), params.max_new_tokens
        lengths = [p.tokens.numel() for p in prompts]
        longest = max(lengths)
        pad = [longest - n for n in lengths]
        total = longest + new

        prompt_tokens = torch.full((b, longest), self.pad_token_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            prompt_tokens[i, pad[i]:] = prompt.tokens
        prompt_tokens = prompt_tokens.to(dev)
        positions = self._positions(prompts, pad, total).to(dev)  # [3, b, total] or [b, total]
        padded = any(pad)
        # Left padding is masked for every query; without padding the attention's own causal
        # mask is all it needs (no mask: the fast kernels).
        pad_key = torch.arange(total, device=dev)[None, :] < torch.tensor(pad, device=dev)[:, None]  # [b, total]
        media = {k: None if v is None else v.to(dev) for k, v in concat_media(prompts).items()}
        stop_ids = torch.tensor(params.stop_token_ids or [-1], device=dev)
        temperature = params.temperature if params.temperature > 0 else 1.0
        generator = torch.Generator(device=dev).manual_seed(params.seed)

        out = torch.full((b, new), self.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(b, new, dtype=torch.float32, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        stopped = torch.zeros(b, dtype=torch.bool, device=dev)
        n_new = torch.zeros(b, dtype=torch.long, device=dev)  # tokens generated per row, stop included
        pad_token = torch.full((b,), self.pad_token_id, dtype=torch.long, device=dev)
        context = StaticInferenceContext(max_batch_size=b, max_sequence_length=total)
        steps = 0
        # No op in here passes a CUDA device, so the CPU adapter's per-op dispatch is lifted.
        with (sequence_parallel_off(model), context_parallel_off(model), te_mask_types(model),
              keys_rotated_once(model), cpu_adapter.device_redirect_suspended()):
            logits = self._forward(
                prompt_tokens, positions[..., :longest], inference_context=context, runtime_gather_output=True,
                attention_mask=padding_mask(pad_key, 0, longest) if padded else None,
                media_mask=~pad_key[:, :longest], **media,
            )  # [b, longest, vocab (padded)]
            for step in range(new):
                if self.stage.last:
                    last = logits[:, -1, : self.vocab_size].float()  # [b, vocab]
                    next_tokens = _sample(last, params, generator)
                    logprobs[:, step] = torch.log_softmax(last / temperature, dim=-1).gather(-1, next_tokens[:, None])[:, 0]
                else:
                    next_tokens = torch.empty(b, dtype=torch.long, device=dev)
                next_tokens = self.stage.from_last(next_tokens)  # every stage feeds the same tokens
                next_tokens = torch.where(done, pad_token, next_tokens)
                out[:, step] = next_tokens
                n_new += ~done
                hit = ~done & torch.isin(next_tokens, stop_ids)
                stopped |= hit
                done |= hit
                steps = step + 1
                if steps == new or (params.stop_token_ids and steps % STOP_CHECK_EVERY == 0 and bool(done.all())):
                    break
                end = longest + steps  # the sequence after this token
                context.sequence_len_offset = end - 1  # the cache holds every token before this one
                logits = self._forward(
                    next_tokens[:, None], positions[..., end - 1 : end], inference_context=context,
                    runtime_gather_output=True,
                    # a generated query is never padding: the key padding alone is its mask
                    attention_mask=pad_key[:, None, None, :end] if padded else None,
                    media_mask=False,  # generated tokens are never media
                    decode=True,
                )  # [b, 1, vocab (padded)]
        model.train(was_training)
        self.stage.from_last(logprobs)
        n_new, stopped = n_new.tolist(), stopped.tolist()
        out, logprobs = out[:, :steps].cpu(), logprobs[:, :steps].cpu()
        return [
            Completion(tokens=out[i, :n].clone(), logprobs=logprobs[i, :n].clone(),
                       finish_reason="stop" if stopped[i] else "length")
            for i, n in enumerate(n_new)
        ]
