"""Run megatron-core's real TP/PP/EP/DP code on CPU with the gloo backend.

megatron-core (targeted version: 0.16.1, see ``TARGET_MEGATRON_VERSION``) assumes CUDA
everywhere: ``device="cuda"`` factories, ``torch.cuda.current_device()``, CUDA RNG
helpers, streams and events, and optimizer checks of ``param.type()`` against
``'torch.cuda.FloatTensor'``. This module redirects exactly those to the CPU. It is
installed only when CUDA is absent (``megavlm.platform.setup``), and every patched
symbol is listed in ``PATCHED_SYMBOLS`` so that a test fails loudly when a megatron-core
upgrade renames one.

Why a TorchFunctionMode for device arguments: megatron-core creates tensors with
``device="cuda"`` or ``device=torch.cuda.current_device()`` in dozens of places; the mode
rewrites only CUDA device arguments (and ``Tensor.cuda``) and leaves every other call
untouched. torch.distributed calls are never routed through it (they take no device).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging

import torch
from torch.overrides import TorchFunctionMode

TARGET_MEGATRON_VERSION = "0.16.1"

_CPU = torch.device("cpu")
_TENSOR_TYPE = torch.Tensor.type

# (module, attribute) pairs this adapter replaces; checked by tests against the installed
# megatron-core so that an upgrade that moves one of them fails loudly instead of silently.
PATCHED_SYMBOLS = (
    ("torch.cuda", "current_device"),
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "set_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "Stream"),
    ("torch.cuda", "Event"),
    ("torch.cuda", "current_stream"),
    ("torch.cuda", "default_stream"),
    ("torch.cuda", "stream"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "empty_cache"),
    ("torch.distributed", "all_to_all_single"),
    ("torch.distributed", "all_gather"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.transformer.moe.moe_utils", "te_general_gemm"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._set_main_param_and_optimizer_states"),
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl"),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"),
)

# megatron-core references this name without defining it when Transformer Engine is absent.
UNDEFINED_WITHOUT_TE = (("megatron.core.transformer.moe.moe_utils", "te_general_gemm"),)

_installed = False
_function_mode: TorchFunctionMode | None = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU; every other call passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _CpuEvent:
    """Stand-in for torch.cuda.Event: CPU work is synchronous, so every event is complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _CpuStream:
    """Stand-in for torch.cuda.Stream: one ordered stream of synchronous work."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_CURRENT_STREAM = _CpuStream()


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    torch.random.default_generator.manual_seed(int(seed))


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda():
    """Make ``tensor.type()`` report CPU float tensors as ``torch.cuda.*`` within the block.

    megatron's optimizers accept fp32 parameters only if ``param.type()`` equals
    ``'torch.cuda.FloatTensor'``; this is scoped to the few functions that check it.
    """
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            # Under _CudaToCpuMode, torch re-dispatches to this patched method, so the
            # inner call may already have renamed it.
            name = _TENSOR_TYPE(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)

    outer = torch.Tensor.type  # nested use keeps working
    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = outer


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_named_as_cuda():
            return fn(*args, **kwargs)

    return wrapper


def _all_to_all_single_with_list_splits(original):
    """gloo needs split sizes as Python lists; megatron's MoE dispatcher passes tensors."""

    @functools.wraps(original)
    def wrapper(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    return wrapper


def _all_gather_uneven_first_dim(original):
    """gloo's all_gather needs equal shapes; megatron's MoE dispatcher (EP with expert TP)
    gathers token blocks of different lengths. Pad along dim 0, gather, then trim."""

    @functools.wraps(original)
    def wrapper(tensor_list, tensor, group=None, async_op=False):
        if len({t.shape for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original(gathered, padded, group=group)
        for out, full in zip(tensor_list, gathered):
            out.copy_(full[: out.shape[0]])
        return None

    return wrapper


def _keep_torch_adam_step(original):
    """Without TE/apex the inner optimizer is torch's Adam, whose per-parameter state has a
    ``step`` tensor that megatron's layout-independent checkpoint does not carry (it
    restores ``step`` separately, in load_state_dict); keep the existing one."""

    @functools.wraps(original)
    def wrapper(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    return wrapper


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron's CPU fallback ``local_multi_tensor_l2_norm`` (amp_C's interface):
    the same per-tensor norms and the same norm of their fp32 vector, bit for bit, but as one
    ``_foreach_norm`` call. megatron's fallback loops in Python and builds the vector with
    ``torch.tensor(list of 0-d tensors)``, one host read per gradient (110 per step for the
    tiny VLM); on a GPU TE's or apex's fused kernel is used instead and this is not installed.
    """
    norms = [n for tensors in tensor_lists for n in torch._foreach_norm(tensors)]
    if not norms:
        return torch.zeros(1), None
    if len({n.dtype for n in norms}) > 1:
        norms = [n.float() for n in norms]
    # In the gradients' dtype, as megatron's vector of norms is (bf16 grads: a bf16 norm).
    return torch.linalg.vector_norm(torch.stack(norms)).float().reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron's ``local_multi_tensor_scale`` (``dst.copy_(src * scale)`` per
    tensor, a temporary each): in place with one ``_foreach_mul_`` when ``src`` is ``dst``
    (gradient clipping), else one ``_foreach_mul`` and one ``_foreach_copy_``. Same values."""
    src, dst = tensor_lists
    if len(src) == len(dst) and all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _resolve(module_name: str, attr_path: str):
    """Return (owner object, final attribute name), raising if any part is missing."""
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    if not hasattr(owner, name) and (module_name, attr_path) not in UNDEFINED_WITHOUT_TE:
        raise AttributeError(
            f"megavlm CPU adapter: {module_name}.{attr_path} not found; the adapter targets "
            f"megatron-core {TARGET_MEGATRON_VERSION}, update megavlm/platform/cpu_adapter.py"
        )
    return owner, name


def _replacements():
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    build_groups = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]
    clip_fn = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    return {
        # A device object rather than an index: megatron passes it as ``device=`` also in
        # autograd backward functions, where the TorchFunctionMode (thread-local) is inactive.
        ("torch.cuda", "current_device"): lambda: _CPU,
        ("torch.cuda", "get_rng_state"): lambda device="cuda": torch.get_rng_state(),
        ("torch.cuda", "set_rng_state"): lambda new_state, device="cuda": torch.set_rng_state(new_state),
        ("torch.cuda", "manual_seed"): _cpu_manual_seed,
        ("torch.cuda", "Stream"): _CpuStream,
        ("torch.cuda", "Event"): _CpuEvent,
        ("torch.cuda", "current_stream"): lambda device=None: _CURRENT_STREAM,
        ("torch.cuda", "default_stream"): lambda device=None: _CURRENT_STREAM,
        ("torch.cuda", "stream"): lambda stream: contextlib.nullcontext(),
        ("torch.cuda", "synchronize"): lambda device=None: None,
        ("torch.cuda", "empty_cache"): lambda: None,
        ("torch.distributed", "all_to_all_single"): _all_to_all_single_with_list_splits(
            torch.distributed.all_to_all_single
        ),
        ("torch.distributed", "all_gather"): _all_gather_uneven_first_dim(torch.distributed.all_gather),
        ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"): _cpu_get_rng_state,
        ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"): _cpu_set_rng_state,
        ("megatron.core.transformer.moe.moe_utils", "te_general_gemm"): None,
        (
            "megatron.core.optimizer.distrib_optimizer",
            "DistributedOptimizer._build_model_and_main_param_groups",
        ): classmethod(_with_cuda_type_names(build_groups.__func__)),
        ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"): clip_fn,
        ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"): clip_fn,
        # Without CUDA there is no TE or apex kernel: megatron binds its Python-loop fallbacks.
        ("megatron.core.optimizer.clip_grads", "l2_norm_impl"): _foreach_l2_norm,
        ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"): _foreach_scale,
        (
            "megatron.core.optimizer.distrib_optimizer",
            "DistributedOptimizer._set_main_param_and_optimizer_states",
        ): _keep_torch_adam_step(DistributedOptimizer._set_main_param_and_optimizer_states),
    }


class _DropCpuRngWarning(logging.Filter):
    """On CPU the 'CUDA' RNG tracker state *is* the CPU generator, so megatron's warning
    that the CPU RNG changed inside a tracker fork is expected and meaningless."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@contextlib.contextmanager
def device_redirect_suspended():
    """Run the block without the CUDA-to-CPU ``TorchFunctionMode``: every torch call in it then
    dispatches straight to C++ instead of through a Python ``__torch_function__`` (on a tiny
    model's decode step, most of the time). For code that passes no ``device="cuda"`` (the
    patched ``torch.cuda.current_device()`` already returns the CPU); a CUDA device argument
    inside fails loudly ("Torch not compiled with CUDA"), never silently. A no-op when the
    adapter is not installed or when another mode is on top of it (popping it would pop that one).
    """
    stack = torch.overrides._get_current_function_mode_stack()
    if _function_mode is None or not stack or stack[-1] is not _function_mode:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def install() -> None:
    """Patch torch.cuda and megatron-core for CPU execution. Idempotent; refuses on CUDA."""
    global _installed, _function_mode
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megavlm CPU adapter must not be installed when CUDA is available")
    replacements = _replacements()
    assert set(replacements) == set(PATCHED_SYMBOLS), "PATCHED_SYMBOLS out of sync"
    for module_name, attr_path in PATCHED_SYMBOLS:
        owner, name = _resolve(module_name, attr_path)
        setattr(owner, name, replacements[(module_name, attr_path)])
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropCpuRngWarning())
    _function_mode = _CudaToCpuMode()
    _function_mode.__enter__()
    _installed = True
