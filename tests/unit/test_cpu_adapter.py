"""The CPU adapter patches exactly the megatron-core symbols it names, and they exist."""

from __future__ import annotations

import importlib

import pytest
import torch

from megavlm.platform import cpu_adapter


@pytest.mark.parametrize("module_name, attr_path", cpu_adapter.PATCHED_SYMBOLS)
def test_patched_symbol_exists_in_installed_megatron(module_name, attr_path):
    """Fails loudly when a megatron-core upgrade renames or removes a patched symbol."""
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    if (module_name, attr_path) not in cpu_adapter.UNDEFINED_WITHOUT_TE:
        assert hasattr(owner, name), f"{module_name}.{attr_path} is gone"


def test_targets_installed_megatron_version():
    from megatron.core import package_info

    assert package_info.__version__ == cpu_adapter.TARGET_MEGATRON_VERSION


def test_cuda_device_arguments_go_to_cpu():
    mode = cpu_adapter._CudaToCpuMode()
    with mode:
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
        t = torch.ones(3)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"


def test_type_names_scoped_to_block():
    t = torch.zeros(1)
    with cpu_adapter._cpu_tensors_named_as_cuda():
        assert t.type() == "torch.cuda.FloatTensor"
    assert t.type() == "torch.FloatTensor"


def test_all_to_all_split_sizes_become_lists():
    seen = {}

    def fake(output, input, output_split_sizes=None, input_split_sizes=None):
        seen.update(out=output_split_sizes, inp=input_split_sizes)

    cpu_adapter._all_to_all_single_with_list_splits(fake)(None, None, torch.tensor([1, 2]), torch.tensor([3, 0]))
    assert seen == {"out": [1, 2], "inp": [3, 0]}


def test_device_redirect_suspended_lifts_only_the_adapter_mode(monkeypatch):
    """The decode hot path runs without the adapter's per-op Python dispatch; the mode comes back
    after the block, and a mode pushed on top of it by someone else is never popped instead."""
    mode = cpu_adapter._CudaToCpuMode()
    monkeypatch.setattr(cpu_adapter, "_function_mode", mode)
    stack = torch.overrides._get_current_function_mode_stack
    with mode:
        with cpu_adapter.device_redirect_suspended():
            assert mode not in stack()
        assert stack()[-1] is mode and torch.zeros(1, device="cuda").device.type == "cpu"
        with torch.overrides.TorchFunctionMode() as other:
            with cpu_adapter.device_redirect_suspended():
                assert stack()[-2:] == [mode, other]


def test_foreach_grad_norm_and_scale_equal_megatrons_fallbacks():
    """The gradient-clipping kernels installed on CPU give megatron's own fallback results bit
    for bit (its Python loops are the reference): the total L2 norm of fp32 and bf16 gradient
    lists of mixed sizes, in-place clipping, and an out-of-place scaled copy."""
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        grads = [torch.randn(n, generator=g).to(dtype) * s for n, s in ((1, 3.0), (257, 1e-3), (4096, 0.5), (3, 1e4))]
        ours, _ = cpu_adapter._foreach_l2_norm(2048 * 32, None, [grads], False)
        with cpu_adapter._CudaToCpuMode():  # megatron's fallback allocates on "cuda"
            ref, _ = local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
        assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape == (1,)
        assert torch.equal(ours, ref), (dtype, ours, ref)

    grads = [torch.randn(n, generator=g) for n in (5, 300, 7)]
    clipped, expected = [t.clone() for t in grads], [t.clone() for t in grads]
    cpu_adapter._foreach_scale(0, None, [clipped, clipped], 0.37)
    local_multi_tensor_scale(0, None, [expected, expected], 0.37)
    assert all(torch.equal(a, b) for a, b in zip(clipped, expected))
    out, expected_out = [torch.empty_like(t) for t in grads], [torch.empty_like(t) for t in grads]
    cpu_adapter._foreach_scale(0, None, [grads, out], 1.0 / 3)
    local_multi_tensor_scale(0, None, [grads, expected_out], 1.0 / 3)
    assert all(torch.equal(a, b) for a, b in zip(out, expected_out))


def test_clip_grads_uses_the_foreach_kernels():
    """Installed: megatron's clipping module calls them (so a megatron upgrade that rebinds the
    names differently fails here rather than silently keeping the slow loops)."""
    import megatron.core.optimizer.clip_grads as clip_grads

    cpu_adapter.install()
    assert clip_grads.l2_norm_impl is cpu_adapter._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is cpu_adapter._foreach_scale
