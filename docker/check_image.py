"""Check that this environment (the megavlm image) has what megavlm needs, and print versions.

    python docker/check_image.py         # no GPU needed: run at the end of docker/Dockerfile
    python docker/check_image.py --gpu   # on a GPU node: also CUDA, NCCL, Transformer Engine, FP8

The build-time check reads package metadata only: importing Transformer Engine (and with it
megatron-core's TE extensions) needs the CUDA driver, which a `docker build` host may lack.
Exit status 1 when a requirement is not met.
"""

from __future__ import annotations

import argparse
import importlib.util
import importlib.metadata
import platform
import sys

from packaging.version import InvalidVersion, Version

# (what, distribution, minimum release, why)
_MINIMUMS = [
    ("torch", "torch", (2, 6), "megatron-core 0.16.1 needs torch >= 2.6"),
    ("Transformer Engine", "transformer_engine", (2, 2), "megatron-core's tensorwise FP8 recipe needs TE >= 2.2"),
]
_EXACT = [("megatron-core", "megatron-core", "0.16.1", "megavlm is built on megatron-core 0.16.1")]
_PRESENT = [("megavlm", "megavlm")]
# DALI ships one wheel per CUDA major version; the one installed must match torch's CUDA.
_DALI = {"12": "nvidia-dali-cuda120", "13": "nvidia-dali-cuda130"}
# apex's CUDA extensions that megatron-core uses when present: the fused weight-gradient
# GEMM (gradient_accumulation_fusion of megatron's local layers; megavlm turns it off
# without it, megavlm.platform.device) and the multi-tensor kernels of its optimizers.
_APEX_KERNELS = ("fused_weight_gradient_mlp_cuda", "amp_C")


def installed_versions() -> dict[str, str | None]:
    """Distribution name -> installed version (None if absent), python, torch's CUDA, and
    "present" (None if absent) for each apex kernel module, found without importing it."""
    names = [d for _, d, *_ in _MINIMUMS + _EXACT] + [d for _, d in _PRESENT] + list(_DALI.values())
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    for module in _APEX_KERNELS:
        versions[module] = "present" if importlib.util.find_spec(module) is not None else None
    try:
        import torch  # loads without a GPU; CUDA is initialised lazily

        versions["cuda"] = torch.version.cuda
    except ImportError:
        versions["cuda"] = None
    return versions


def _release(version: str) -> tuple[int, ...]:
    """(2, 6, 0) for "2.6.0a0+ecf3bae": NGC's prerelease builds count as their release,
    as in megatron-core's own is_torch_min_version("2.6a0")."""
    return Version(version).release


def problems(versions: dict[str, str | None]) -> list[str]:
    """What is missing or too old, one sentence each; empty when the image is usable."""
    found = []
    if tuple(int(x) for x in versions["python"].split(".")[:2]) < (3, 11):
        found.append(f"Python {versions['python']}: megavlm needs Python >= 3.11 (NGC 25.xx images have 3.12)")
    for what, dist, minimum, why in _MINIMUMS:
        have = versions.get(dist)
        try:
            too_old = have is None or _release(have)[: len(minimum)] < minimum
        except InvalidVersion:
            too_old = True
        if too_old:
            found.append(f"{what} {have or 'not installed'}: {why}")
    for what, dist, wanted, why in _EXACT:
        if versions.get(dist) != wanted:
            found.append(f"{what} {versions.get(dist) or 'not installed'}: {why}")
    for what, dist in _PRESENT:
        if versions.get(dist) is None:
            found.append(f"{what} ({dist}) is not installed")
    cuda = versions.get("cuda")
    major = cuda.split(".")[0] if cuda else None
    if major not in _DALI:
        found.append(f"torch CUDA {cuda}: megavlm's images are CUDA {' or '.join(_DALI)} (DALI wheels "
                     f"{', '.join(_DALI.values())})")
    else:
        wanted = _DALI[major]
        if versions.get(wanted) is None:
            found.append(f"DALI ({wanted}, the build for torch's CUDA {cuda}) is not installed")
        for other_major, other in _DALI.items():
            if other_major != major and versions.get(other) is not None:
                found.append(f"DALI {other} (CUDA {other_major}) is installed but torch has CUDA {cuda}: "
                             f"pip uninstall {other} and install {wanted}")
    for module in _APEX_KERNELS:
        if versions.get(module) is None:
            found.append(f"apex kernel {module} is missing (NGC PyTorch images build apex with it): megatron-core "
                         "falls back to slower paths")
    return found


def gpu_report(require_fp8: bool) -> list[str]:
    """Print what the GPU stack says; return problems (no GPU, no TE, no FP8 if required)."""
    import torch

    from megavlm.platform import device

    found = []
    if not device.has_cuda():
        return ["torch.cuda.is_available() is False: no GPU visible (run it in a GPU job step)"]
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.device_count()} x {props.name} (sm_{props.major}{props.minor})")
    print(f"NCCL: {'.'.join(map(str, torch.cuda.nccl.version()))}, cuDNN: {torch.backends.cudnn.version()}")
    te_error = device.transformer_engine_import_error()
    if te_error is not None:
        return found + [f"Transformer Engine: {te_error} (model.transformer_impl=auto refuses to train on this GPU)"]
    # gradient_accumulation_fusion: TE layers bring their kernel; megatron's local layers
    # (model.transformer_impl=local) need apex's, and megavlm turns the fusion off without it.
    wgrad = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    print(f"apex fused_weight_gradient_mlp_cuda: {'present' if wgrad else 'absent'} "
          f"(gradient_accumulation_fusion with local layers: {'on' if wgrad else 'off'})")
    for recipe in ("delayed", "tensorwise", "mxfp8"):
        ok, why = device.fp8_support(recipe)
        print(f"FP8 recipe {recipe}: {'supported' if ok else 'not supported: ' + why}")
        if require_fp8 and recipe == "delayed" and not ok:
            found.append(f"FP8 (delayed recipe) is not supported here: {why}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="also check CUDA, Transformer Engine and FP8 (GPU node)")
    parser.add_argument("--require-fp8", action="store_true", help="with --gpu: fail if FP8 (delayed) is unsupported")
    args = parser.parse_args()
    versions = installed_versions()
    for name, version in versions.items():
        print(f"{name}: {version or 'not installed'}")
    found = problems(versions)
    if args.gpu:
        found += gpu_report(args.require_fp8)
    for problem in found:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("image check:", "FAILED" if found else "ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
