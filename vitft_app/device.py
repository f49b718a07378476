"""The one device and precision policy. Nothing else in vitft branches on
``torch.cuda.is_available()``: callers ask :func:`resolve_device_plan` and use what it returns."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Literal
import ctypes
import ctypes.util
import gc

import torch

ResolvedPrecision = Literal["bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class DevicePlan:
    """Where and in which precision a run computes.

    Attributes:
        device: ``cuda``, ``mps`` or ``cpu``.
        precision: the resolved precision. Trainable weights always stay fp32; bf16 and fp16
            only mean ``torch.autocast`` around the forward pass.
        reason: one sentence saying why (shown in the UI and the log).
    """

    device: torch.device
    precision: ResolvedPrecision
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """``torch.bfloat16``, ``torch.float16`` or None (fp32)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def use_grad_scaler(self) -> bool:
        """fp16 needs loss scaling (``torch.amp.GradScaler``) to keep small gradients alive."""
        return self.precision == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Returns the autocast context for the forward pass (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """Short text such as ``"cpu, bf16 autocast"``."""
        mode = "fp32" if self.precision == "fp32" else f"{self.precision} autocast"
        return f"{self.device.type}, {mode}"


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), as oneDNN reports it.

    Source: ``torch.ops.mkldnn._is_mkldnn_bf16_supported``; on Linux the ``avx512_bf16`` /
    ``amx_bf16`` flags of ``/proc/cpuinfo`` are checked too, because oneDNN also says True for
    plain AVX512, where bf16 is emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def best_device() -> torch.device:
    """CUDA if present, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device_plan(precision: str = "auto", device: str | torch.device | None = None) -> DevicePlan:
    """Decides device and precision for a run.

    ``auto``: bf16 autocast on CUDA with bf16 support and on CPUs with AVX512-BF16 or AMX,
    otherwise fp32 (MPS included). ``bf16``: accepted on CUDA with bf16 support and on any CPU
    (emulated, slower, where the CPU lacks it). ``fp16``: CUDA only, with a gradient scaler.

    Args:
        precision: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        device: force a device (tests use ``"cpu"``); default :func:`best_device`.

    Returns:
        A :class:`DevicePlan`.

    Raises:
        ValueError: the precision is unknown or not supported on the device.
    """
    dev = torch.device(device) if device is not None else best_device()
    cuda_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if cuda_bf16:
            return DevicePlan(dev, "bf16", "auto: this GPU supports bf16")
        if dev.type == "cpu" and cpu_supports_bf16():
            return DevicePlan(dev, "bf16", "auto: this CPU has native bf16 (AVX512-BF16/AMX)")
        return DevicePlan(dev, "fp32", f"auto: no native bf16 on {dev.type}, using fp32")
    if precision == "fp32":
        return DevicePlan(dev, "fp32", "fp32 as requested")
    if precision == "bf16":
        if dev.type == "cuda" and not cuda_bf16:
            raise ValueError("bf16 is not supported by this GPU; choose fp16, fp32 or auto")
        if dev.type == "mps":
            raise ValueError("bf16 autocast is not supported on Apple MPS here; choose fp32 or auto")
        return DevicePlan(dev, "bf16", "bf16 autocast as requested")
    if precision == "fp16":
        if dev.type != "cuda":
            raise ValueError(
                f"fp16 needs a CUDA GPU (this run is on {dev.type}); choose bf16, fp32 or auto"
            )
        return DevicePlan(dev, "fp16", "fp16 autocast with gradient scaling as requested")
    raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")


def cuda_device_count() -> int:
    """Number of CUDA GPUs this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@functools.lru_cache(maxsize=1)
def _glibc_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``), or None."""

    libc_name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None  # glibc only
    except OSError:
        return None


def release_device_memory() -> None:
    """Returns memory after a run: garbage-collects, empties the CUDA / MPS caching allocators,
    and on Linux with glibc calls ``malloc_trim(0)`` so freed heap pages (decoded images, feature
    stores, activations of the CPU run) go back to the OS instead of staying in malloc's arenas
    (without it the app's RSS grew 20-37% between identical runs; ``benchmarks/bench_memory.py``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps.empty_cache()
    malloc_trim = _glibc_malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)
