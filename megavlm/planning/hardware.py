"""GPU facts the planner needs, from vendor datasheets, looked up by name.

Every number is the vendor's published peak, not a measurement: dense (no 2:4 sparsity)
tensor-core throughput, HBM bandwidth, NVLink bandwidth *per direction* (datasheets quote
the bidirectional total, which we halve), and the InfiniBand bandwidth *per GPU* of the
reference DGX/HGX systems (one ConnectX NIC per GPU). Efficiency factors that turn peaks
into expectations live in the planner (``megavlm.planning.flops``), stated in its output.

Sources:
  * NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3, 3.35 TB/s; BF16 1,979 TFLOP/s
    and FP8 3,958 TFLOP/s *with sparsity* -> 989 / 1,979 dense; NVLink 900 GB/s
    (bidirectional) -> 450 GB/s per direction. DGX H100: 8x ConnectX-7 400 Gb/s NDR,
    one per GPU -> 50 GB/s per GPU.
  * NVIDIA H800 (China export SKU of H100 SXM): same SMs, clocks and HBM; NVLink cut to
    400 GB/s bidirectional -> 200 GB/s per direction.
  * NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s; compute as H100
    SXM (989 dense BF16, 1,979 dense FP8); NVLink 900 GB/s.
  * NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): 80 GB HBM2e, 2,039 GB/s; BF16
    312 TFLOP/s dense (624 sparse); no FP8; NVLink 600 GB/s -> 300 per direction.
    DGX A100: 8x ConnectX-6 200 Gb/s HDR -> 25 GB/s per GPU.

Memory sizes: datasheets say "80GB"/"141GB"; we take them as GiB, as the usual planning
convention. nvidia-smi reports slightly less (81,559 MiB on an H100 SXM), and the CUDA
context, NCCL buffers and allocator fragmentation take more: the planner keeps a margin.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
_TERA = 1e12
_GIGA = 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bf16_flops: float  # dense tensor-core FLOP/s
    fp8_flops: float | None  # dense; None where the GPU has no FP8 tensor cores
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per direction, per GPU
    ib_bytes_per_s: float  # scale-out network per GPU
    gpus_per_node: int = 8

    def peak_flops(self, fp8: bool = False) -> float:
        if fp8:
            if self.fp8_flops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores")
            return self.fp8_flops
        return self.bf16_flops


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("h100-80gb", 80 * GiB, 989 * _TERA, 1979 * _TERA, 3.35 * _TERA, 450 * _GIGA, 50 * _GIGA),
        GPU("h800-80gb", 80 * GiB, 989 * _TERA, 1979 * _TERA, 3.35 * _TERA, 200 * _GIGA, 50 * _GIGA),
        GPU("h200", 141 * GiB, 989 * _TERA, 1979 * _TERA, 4.8 * _TERA, 450 * _GIGA, 50 * _GIGA),
        GPU("a100-80gb", 80 * GiB, 312 * _TERA, None, 2.039 * _TERA, 300 * _GIGA, 25 * _GIGA),
    )
}


def gpu_names() -> list[str]:
    return sorted(GPUS)


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(gpu_names())}") from None
