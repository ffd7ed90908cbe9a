"""Library warnings that megavlm knows to be harmless, silenced by message and origin.

Each entry names the module that emits it and a message pattern, so anything else (a new
warning, or one of these from somewhere new) still shows. ``MEGAVLM_ALL_WARNINGS=1``
shows everything. Installed when ``megavlm`` is imported, before megatron-core is,
because several of these fire at megatron's import time.
"""

from __future__ import annotations

import os
import warnings

# (category, message regex, emitting module regex, why it is harmless)
KNOWN = (
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core\.",
     "CPU, or a GPU image without TE: megatron's torch fallbacks are what megavlm runs (cpu only)"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.models\.backends",
     "megavlm uses torch norms on CPU (cpu only)"),
    (UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
     "megatron 0.16 warns about its own cuda_graph_scope default; megavlm does not capture CUDA graphs"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     r"torch\.distributed\.c10d_logger", "megatron-core 0.16 calls these; torch keeps them working"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     r"megavlm\.platform\.cpu_adapter", "megatron's DDP hooks read .grad of its views; the adapter forwards it"),
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
     r"in a single process", r"torch\.distributed\.checkpoint\.",
     "checkpointing.weights reads a checkpoint in one process on purpose"),
    (UserWarning, r"The given NumPy array is not writable", r"megavlm\.data\.encode",
     "decoded frames are read-only buffers; .float() copies them at once, nothing writes the view"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions",
     r"megatron\.core\.dist_checkpointing\.strategies\.torch", "megatron-core 0.16's loader; torch keeps it working"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     r"megavlm\.platform\.cpu_adapter", "megatron-core 0.16 builds ShardedTensors when loading on CPU"),
)


def install(*, cuda: bool | None = None) -> None:
    """Add the filters (the TE/Apex ones only without CUDA, where they are expected)."""
    if os.environ.get("MEGAVLM_ALL_WARNINGS") == "1":
        return
    if cuda is None:
        from megavlm.platform import device

        cuda = device.has_cuda()
    for category, message, module, why in KNOWN:
        if cuda and "(cpu only)" in why:
            continue
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
