"""Which device serving and export run on, and what an AOTInductor package was compiled for."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` / ``cuda:N``, or ``auto`` (CUDA when torch sees a GPU, else CPU). A CUDA
    device on a machine where torch sees none is refused here, by name, not at first use."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda, cuda:N or auto, got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device {str(device)!r}: torch {torch.__version__} ({build}) sees no CUDA device "
                         f"on this machine; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def cuda_arch(device: torch.device) -> str:
    """The GPU's compute capability as nvcc names it (``sm_90``): what AOTInductor compiles for."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def aoti_target(device: torch.device) -> dict:
    """Manifest keys saying what an AOTInductor package was compiled for (checked at load)."""
    if device.type != "cuda":
        return {"aoti_device": device.type}
    return {"aoti_device": "cuda", "aoti_cuda_arch": cuda_arch(device),
            "aoti_gpu": torch.cuda.get_device_name(device), "aoti_cuda_version": torch.version.cuda}
