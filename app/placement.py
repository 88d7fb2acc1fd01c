"""Where `prunedrive prune` computes: the device and dtype of the pruning, and block offload for a model larger
than the device's memory (app.prune_driving and app.prune_hf use it; the options are checked by models.device).

    placement = Placement.checked("cuda", "bfloat16", "auto")
    with placement.running(model.lm):          # the LM on the device, or its blocks visiting it one at a time
        prune(model.lm, ...)
    record.update(placement.record())          # device, dtype, offloaded, device_peak_mem_bytes -> sparsity.json
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from prunedrive.models.device import (DEFAULT_DEVICE, DEFAULT_DTYPE, check_precision, fits_on_device, module_bytes,
                                      peak_memory_bytes, reset_peak_memory, torch_dtype)
from prunedrive.models.pruning.calibration import block_offload, to_device

OFFLOAD_MODES = ("auto", "always", "never")


@dataclass
class Placement:
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    offload: str = "auto"  # auto: offload only a model that does not fit the device's free memory
    offloaded: bool = False
    peaks: list[float] = field(default_factory=list)

    @classmethod
    def checked(cls, device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE, offload: str = "auto") -> Placement:
        device, dtype = check_precision(device, dtype)
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"--offload {offload!r}: allowed: {', '.join(OFFLOAD_MODES)}")
        return cls(device, dtype, offload)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def refuse_training(self, what: str) -> None:
        """DG2PF and --finetune train in float32 only (see app.prune)."""
        if self.dtype != DEFAULT_DTYPE:
            raise ValueError(f"--dtype {self.dtype}: {what} trains, and training runs in float32 only (mixed "
                             "precision is not wired; half-precision weights lose small updates); use --dtype float32")

    @contextlib.contextmanager
    def running(self, module: nn.Module, whole: bool = False):
        """`module` computing on the device for the duration, and back where it was after: moved whole, or (offload)
        left on the CPU with its decoder blocks moved one at a time by the sequential replay. `whole`: never
        offloaded (the vector encoder, which is small; DG2PF's training, which needs the whole model). The
        device's peak memory over the duration is kept for `record`."""
        whole_fits = fits_on_device(module_bytes(module), self.device)
        if (self.offload == "never" or whole) and not whole_fits:
            raise MemoryError(f"--offload never: the model ({module_bytes(module) / 2**30:.2f} GiB) does not fit the "
                              f"free memory of {self.device}; use --offload auto")
        offload = not whole and (self.offload == "always" or (self.offload == "auto" and not whole_fits))
        self.offloaded = self.offloaded or offload
        reset_peak_memory(self.device)
        home = next(module.parameters()).device
        try:
            if offload:
                with block_offload(self.device):
                    yield module
            else:
                module.to(self.device)
                yield module
        finally:
            module.to(home)
            self.peaks.append(peak_memory_bytes(self.device))

    def forward_on_device(self, forward):
        """A training forward(model, batch) whose batch (built on the CPU) is moved to the device first."""
        device = torch.device(self.device)
        return lambda model, batch: forward(model, to_device(batch, device))

    def record(self) -> dict:
        """What sparsity.json gets: device, dtype, offloaded, and the device's peak memory during pruning (bytes,
        the highest over the phases; null on the CPU)."""
        peaks = [p for p in self.peaks if p == p]  # NaN (the CPU) is no figure
        return {"device": self.device, "dtype": self.dtype, "offloaded": self.offloaded,
                "device_peak_mem_bytes": max(peaks) if peaks else None}
