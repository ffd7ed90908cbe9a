"""megatron-core's row-parallel linear, passing its own TP group to the GEMM function.

``RowParallelLinear.forward`` (megatron-core 0.16.1) calls
``linear_with_grad_accumulation_and_async_allreduce(..., tp_group=None)``; the function
then looks the default group up and fires (and filters) a ``DeprecationWarning`` on every
call: about 90 warnings per decode step of a 4-layer model, and under ``torch.compile`` a
graph break in the middle of each layer (dynamo cannot trace ``warnings.warn``), which split
every compiled layer into four graphs. The group is the layer's own ``tp_group``, which
the function ignores for a row-parallel GEMM anyway (no sequence-parallel gather, no dgrad
all-reduce inside it), so passing it changes no number.
"""

from __future__ import annotations

from megatron.core import tensor_parallel


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """``tensor_parallel.RowParallelLinear`` whose GEMM call names the layer's TP group."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)
