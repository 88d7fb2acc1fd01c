"""Where a model runs and in what precision: the one place `--device` and `--dtype` are parsed and checked, and
the device-side clock and memory counters the agents report.

    device = check_device("cuda:1")           # "cuda:1", or ValueError naming the option and what is allowed
    dtype = parse_dtype("bfloat16")           # "bfloat16"; torch_dtype(dtype) -> torch.bfloat16
    check_precision("cpu", "float16")         # ValueError: float16 is refused on the CPU (see below)

Devices: "cpu", "cuda" (torch's current CUDA device) or "cuda:N". A CUDA device where CUDA is absent (no GPU, a
CPU-only torch) or an index past the cards present is refused before anything runs, with a message naming the
option. Dtypes: float32 (default), bfloat16, float16. float16 on the CPU is refused, not warned about: torch's CPU
half-precision matmuls are many times slower than float32 and some kernels the models use have no CPU half
version, so a run would either crawl or fail mid-episode; bfloat16 on the CPU is allowed (it works, and gives
the same arithmetic a bfloat16 GPU run rounds to, a useful CPU check of a bfloat16 model).

Timing: `DeviceClock` measures a call with CUDA events recorded on the device's stream and synchronised, so the
figure is what the GPU spent, not when Python returned (kernel launches are asynchronous). On the CPU it measures
nothing (NaN): there the runner's wall time already is the agent's time. `peak_memory_bytes` is
`torch.cuda.max_memory_allocated` since the last `reset_peak_memory` (NaN on the CPU, where the process RSS is
recorded instead).
"""
from __future__ import annotations

import math
import re

import torch

DEVICE_KINDS = ("cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DEVICE, DEFAULT_DTYPE = "cpu", "float32"
_DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?")


def parse_device(value: object, option: str = "--device") -> str:
    """The device's canonical spelling ("cpu", "cuda", "cuda:N"); no availability check (see check_device)."""
    text = str(value).strip().lower() if value is not None else ""
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"{option} {value!r}: allowed: {', '.join(DEVICE_KINDS)} (N a GPU index, e.g. cuda:0)")
    return text if ":" not in text else f"cuda:{int(text.split(':')[1])}"


def parse_dtype(value: object, option: str = "--dtype") -> str:
    text = str(value).strip().lower() if value is not None else ""
    if text not in DTYPES:
        raise ValueError(f"{option} {value!r}: allowed: {', '.join(DTYPES)}")
    return text


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[parse_dtype(name)]


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def check_device(value: object, option: str = "--device") -> str:
    """parse_device, and refuse a CUDA device this machine does not have (before anything runs)."""
    device = parse_device(value, option)
    if not is_cuda(device):
        return device
    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = (f"torch {torch.__version__} is built for CUDA {built} but finds no usable GPU (driver, "
               "CUDA_VISIBLE_DEVICES)" if built else f"torch {torch.__version__} is a CPU-only build")
        raise ValueError(f"{option} {device}: CUDA is not available here ({why}); use {option} cpu")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def check_precision(device: object = DEFAULT_DEVICE, dtype: object = DEFAULT_DTYPE,
                    options: tuple[str, str] = ("--device", "--dtype")) -> tuple[str, str]:
    """(device, dtype), both checked: the device exists, the dtype is known, and float16 is not asked of the CPU."""
    device, dtype = check_device(device, options[0]), parse_dtype(dtype, options[1])
    if dtype == "float16" and not is_cuda(device):
        raise ValueError(f"{options[1]} float16 on {options[0]} cpu: refused, torch's CPU half-precision matmuls are "
                         "slow or missing; use bfloat16 or float32 on the CPU, float16 on a GPU")
    return device, dtype


def precision_options(device: str, dtype: str) -> dict[str, str]:
    """The factory keywords of a non-default precision (empty for cpu/float32): what model agents' specs carry,
    so a default run's recorded agents (and its resume identity) are what they were before these options."""
    return {k: v for k, v, default in (("device", device, DEFAULT_DEVICE), ("dtype", dtype, DEFAULT_DTYPE))
            if v != default}


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak (per episode): torch.cuda.reset_peak_memory_stats on a CUDA device, nothing on the CPU."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_bytes(device: str | torch.device) -> float:
    """torch.cuda.max_memory_allocated since the last reset on a CUDA device; NaN on the CPU."""
    return float(torch.cuda.max_memory_allocated(torch.device(device))) if is_cuda(device) else math.nan


class DeviceClock:
    """`with DeviceClock(device) as clock: ...` then `clock.seconds`: the device time of the block, from CUDA
    events recorded before and after it and synchronised; NaN on the CPU (no device clock: use wall time)."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.seconds = math.nan
        self._events = None

    def __enter__(self) -> DeviceClock:
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                self._events[0].record()
        return self

    def __exit__(self, *exc) -> None:
        if self._events is None:
            return
        start, end = self._events
        with torch.cuda.device(self.device):
            end.record()
        end.synchronize()
        self.seconds = start.elapsed_time(end) / 1000.0  # elapsed_time is in milliseconds


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared ones once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def fits_on_device(nbytes: int, device: str | torch.device, headroom: float = 1.5) -> bool:
    """Whether `nbytes` (times `headroom`, for activations and statistics) fit in the device's free memory now
    (torch.cuda.mem_get_info); always True for the CPU, where the model already is."""
    if not is_cuda(device):
        return True
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return nbytes * headroom <= free


def device_figures(device: str | torch.device, seconds: float) -> dict[str, float]:
    """What an agent reports of one call on `device` (harness.compute.StepCompute): its device time and the peak
    device memory so far this episode. Nothing on the CPU: the fields stay the runner's NaN, and a report of a
    CPU step holds only numbers it measured."""
    if not is_cuda(device):
        return {}
    return {"device_time_s": float(seconds), "device_peak_mem_bytes": peak_memory_bytes(device)}
