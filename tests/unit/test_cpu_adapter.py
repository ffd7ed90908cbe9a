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
