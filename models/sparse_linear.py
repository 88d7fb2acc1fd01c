"""Run pruned nn.Linear layers through the fastest *measured* execution path.

    report = accelerate(model, rows={1: 23, 28: 1})   # 23 one-row decode calls + one 28-row prefill per step
    report["lm.model.layers.0.mlp.down_proj"].path     # 'dense' | 'csr' | 'ell' | 'semi_structured'

Why measure: on CPU at batch 1 a sparse kernel's fixed cost (format checks, index arithmetic, allocation)
often exceeds the multiply-adds it saves, so a pruned weight is not automatically a faster weight. For
every pruned layer `accelerate` times each candidate at the row counts the agent really runs, rejects a
candidate whose output differs from the dense masked output, and installs the cheapest. Dense is always a
candidate, so a layer never gets slower than today.

Paths (all compute y = x W^T + b for the same masked W):
  dense            F.linear on the masked dense weight (MKL sgemv/sgemm). The fallback, always correct.
  csr              torch.sparse_csr weight, torch.addmm / torch.sparse.mm (MKL sparse on CPU).
  ell              row-packed ("ELLPACK") in plain torch: per output row the column indices and values of its
                   non-zeros, padded to the longest row; y = sum_k x[:, idx] * vals. One gather, one multiply,
                   one reduction, no sparse kernel needed.
  semi_structured  torch.sparse.to_sparse_semi_structured (2:4, CUDA only; refused elsewhere).
torch.compile'd ELL was tried on this 2-core CPU and dropped: ~40 s to compile one shape and ~120 us per
call (guard and wrapper overhead) against ~15 us for the dense matvec.

`SparseLinear` subclasses nn.Linear and shares the original weight and bias Parameters, so state_dict,
save_pretrained, weight tying and code that looks for nn.Linear (pruning, FLOP counting) are unaffected.
The packed copy is rebuilt when the weight changes in place (tracked by the tensor's version counter;
changes made through `.data` bypass it: call `refresh(module)` after those).
"""
from __future__ import annotations

import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunedrive.models.pruning.masks import EXCLUDE, find_linears

PATHS = ("dense", "csr", "ell", "semi_structured")
SPARSE_PATHS = PATHS[1:]


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"unknown execution path {path!r}; choose from {', '.join(PATHS)}")
    return path


def is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input columns of every row."""
    if weight.shape[-1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


class SparseLinear(nn.Linear):
    """An nn.Linear whose forward runs through `path`; `weight` stays the dense masked Parameter."""

    def __init__(self, linear: nn.Linear, path: str = "dense"):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the Parameters are the original layer's, not new ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.set_path(path)

    def set_path(self, path: str) -> None:
        self.path = check_path(path)
        self._pack()

    @torch.no_grad()
    def _pack(self) -> None:
        """Build the executed format from the current weight (raises if this path cannot run it)."""
        w = self.weight.detach()
        self._csr = self._idx = self._vals = self._semi = None
        if self.path == "csr":
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per layer
                warnings.simplefilter("ignore", UserWarning)
                self._csr = w.to_sparse_csr()
        elif self.path == "ell":
            nnz = (w != 0).sum(1)
            k = max(int(nnz.max()), 1)
            # topk over the non-zero flags picks each row's non-zeros first; short rows are padded with
            # zero-valued entries, which add nothing to the sum.
            idx = torch.topk((w != 0).to(torch.int8), k, dim=1).indices
            self._vals, self._idx, self._k = w.gather(1, idx), idx.reshape(-1), k
        elif self.path == "semi_structured":
            if not w.is_cuda:
                raise NotImplementedError("semi_structured needs a CUDA weight")
            if not is_2_4(w):
                raise NotImplementedError("semi_structured needs a 2:4 pattern")
            self._semi = torch.sparse.to_sparse_semi_structured(w)
        # id, not the Parameter itself: assigning a Parameter to a Module attribute would register it.
        self._source, self._version = id(self.weight), self.weight._version

    def _stale(self) -> bool:
        return id(self.weight) != self._source or self.weight._version != self._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "dense":
            return F.linear(x, self.weight, self.bias)
        if self._stale():
            self._pack()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path == "csr":
            # W (out, in) sparse @ x^T (in, rows): the sparse operand must come first.
            y = (torch.sparse.mm(self._csr, x2.T) if self.bias is None
                 else torch.addmm(self.bias[:, None], self._csr, x2.T)).T
        elif self.path == "ell":
            gathered = torch.index_select(x2, 1, self._idx).view(x2.shape[0], self.out_features, self._k)
            y = gathered.mul_(self._vals).sum(-1)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self._semi, self.bias)
        return y.reshape(*lead, self.out_features)

    # -- what executes -----------------------------------------------------------------------------
    @property
    def executed_weights(self) -> int:
        """Weight entries the executed kernel multiplies per input row (padding and 2:4 halves included)."""
        if self.path == "csr":
            return int(self._csr.values().numel())
        if self.path == "ell":
            return int(self._vals.numel())
        if self.path == "semi_structured":
            return self.weight.numel() // 2
        return self.weight.numel()

    def storage_bytes(self) -> int:
        """Bytes of the executed weight format (indices included; the dense master copy is not counted
        for sparse paths, though it stays in memory for weight semantics)."""
        nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        if self.path == "csr":
            return nbytes(self._csr.values(), self._csr.col_indices(), self._csr.crow_indices())
        if self.path == "ell":
            return nbytes(self._vals, self._idx)
        if self.path == "semi_structured":
            parts = [getattr(self._semi, n, None) for n in ("packed", "meta")]
            return nbytes(*[p for p in parts if p is not None])
        return nbytes(self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, path={self.path}"


def executed_weights(linear: nn.Linear) -> int:
    return linear.executed_weights if isinstance(linear, SparseLinear) else linear.weight.numel()


def storage_bytes(linear: nn.Linear) -> int:
    if isinstance(linear, SparseLinear):
        return linear.storage_bytes()
    return linear.weight.numel() * linear.weight.element_size()


def refresh(module: nn.Module) -> None:
    """Rebuild every SparseLinear's packed weight (after editing weights through `.data`)."""
    for m in module.modules():
        if isinstance(m, SparseLinear):
            m._pack()


# -- choosing a path by measurement ---------------------------------------------------------------
@dataclass
class LayerChoice:
    path: str
    sparsity: float
    workload: dict[int, float]                                       # rows -> calls per step
    times_us: dict[str, dict[int, float]] = field(default_factory=dict)  # path -> rows -> us per call
    cost_us: dict[str, float] = field(default_factory=dict)          # path -> us per step (workload-weighted)
    rejected: dict[str, str] = field(default_factory=dict)           # path -> why


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_us(layer: nn.Module, x: torch.Tensor, number: int) -> float:
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(number):
        layer(x)
    _sync(x.device)
    return (time.perf_counter() - start) / number * 1e6


def _workload(rows: Sequence[int] | Mapping[int, float]) -> dict[int, float]:
    work = dict(rows) if isinstance(rows, Mapping) else {int(r): 1.0 for r in rows}
    if not work or any(int(r) < 1 for r in work):
        raise ValueError(f"rows must be positive row counts, got {rows!r}")
    return {int(r): float(c) for r, c in work.items()}


def _tolerance(path: str, rtol: float, atol: float, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    # cuSPARSELt/CUTLASS may run fp32 as TF32: ~1e-3 relative, still far below a wrong-index error.
    if path == "semi_structured":
        rtol, atol = max(rtol, 1e-2), max(atol, 1e-2)
    if dtype in (torch.bfloat16, torch.float16):  # another summation order moves a half-precision sum by ulps
        eps = 8 * torch.finfo(dtype).eps
        rtol, atol = max(rtol, eps), max(atol, eps)
    return rtol, atol


@torch.no_grad()
def choose_path(linear: nn.Linear, rows: Sequence[int] | Mapping[int, float] = (1,), candidates: Sequence[str] = PATHS,
                rounds: int = 5, number: int = 20, rtol: float = 1e-4, atol: float = 1e-5) -> LayerChoice:
    """Verify and time every candidate on this layer's weight; the cheapest correct one wins."""
    work = _workload(rows)
    candidates = ["dense"] + [check_path(p) for p in candidates if p != "dense"]
    w = linear.weight
    choice = LayerChoice("dense", float((w == 0).float().mean()), work)
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = {r: torch.randn(1, r, linear.in_features, generator=gen).to(w.device, w.dtype) for r in work}
    reference = {r: F.linear(x, w, linear.bias) for r, x in inputs.items()}
    runners = {}
    for path in candidates:
        try:
            layer = SparseLinear(linear, path)
        except (NotImplementedError, RuntimeError, ValueError) as e:  # this path cannot hold this weight here
            choice.rejected[path] = f"unavailable: {e}"
            continue
        rt, at = _tolerance(path, rtol, atol, w.dtype)
        try:
            bad = [r for r in work
                   if not torch.allclose(layer(inputs[r]).float(), reference[r].float(), rtol=rt, atol=at)]
        except (NotImplementedError, RuntimeError) as e:  # no kernel for this dtype here (CPU csr in bfloat16)
            choice.rejected[path] = f"unavailable: {e}"
            continue
        if bad:
            choice.rejected[path] = f"output differs from dense masked at rows {bad}"
            continue
        runners[path] = layer
    for r, x in inputs.items():
        for layer in runners.values():  # warm-up: first calls allocate and pack
            layer(x)
        best = {p: float("inf") for p in runners}
        for _ in range(rounds):  # round-robin, so a noisy moment on a shared machine hits every candidate
            for p, layer in runners.items():
                best[p] = min(best[p], _time_us(layer, x, number))
        for p in runners:
            choice.times_us.setdefault(p, {})[r] = best[p]
    choice.cost_us = {p: sum(work[r] * t for r, t in ts.items()) for p, ts in choice.times_us.items()}
    choice.path = min(choice.cost_us, key=choice.cost_us.get)
    return choice


def _install(root: nn.Module, name: str, linear: nn.Linear, path: str) -> SparseLinear:
    if isinstance(linear, SparseLinear):
        linear.set_path(path)
        return linear
    parent_name, _, child = name.rpartition(".")
    wrapped = SparseLinear(linear, path)
    setattr(root.get_submodule(parent_name) if parent_name else root, child, wrapped)
    return wrapped


def _forced(name: str, force: Mapping[str, str]) -> str | None:
    """A forced path for `name`: keys match the full name or its trailing dotted parts ('mlp.down_proj')."""
    for key, path in force.items():
        if name == key or name.endswith("." + key):
            return check_path(path)
    return None


def accelerate(model: nn.Module, rows: Sequence[int] | Mapping[int, float] = (1,), *,
               layer_rows: Mapping[str, Sequence[int] | Mapping[int, float]] | None = None,
               candidates: Sequence[str] = PATHS, force: Mapping[str, str] | None = None,
               min_sparsity: float = 0.2, exclude: tuple[str, ...] = EXCLUDE, **timing) -> dict[str, LayerChoice]:
    """Install the fastest correct path on every pruned nn.Linear of `model` (lm_head excluded).

    rows: the row counts a layer sees per step, as a list (equal weight) or {rows: calls per step}, e.g.
    {1: decode_steps, P: 1}; layer_rows overrides it per layer name (the encoder sees other row counts).
    A layer is pruned when at least `min_sparsity` of its weights are zero; others are left alone.
    force: {name or name suffix: path} installs that path without timing (it is still verified).
    timing: rounds, number, rtol, atol for `choose_path`. Returns {layer name: LayerChoice}.
    """
    for p in candidates:
        check_path(p)
    force = {k: check_path(v) for k, v in (force or {}).items()}
    report = {}
    for name, linear in find_linears(model, exclude).items():
        sparsity = float((linear.weight == 0).float().mean())
        if sparsity < min_sparsity:
            if isinstance(linear, SparseLinear):
                linear.set_path("dense")  # un-pruned since the last call
            continue
        work = (layer_rows or {}).get(name, rows)
        pinned = _forced(name, force)
        choice = choose_path(linear, work, [pinned] if pinned else candidates, **timing)
        if pinned and pinned not in choice.times_us:
            raise RuntimeError(f"forced path {pinned!r} for {name}: {choice.rejected.get(pinned)}")
        if pinned:
            choice.path = pinned
        _install(model, name, linear, choice.path)
        report[name] = choice
    return report


def layer_type(name: str) -> str:
    """'lm.model.layers.3.mlp.down_proj' -> 'lm.model.layers.*.mlp.down_proj' (groups layers across blocks)."""
    return re.sub(r"\blayers\.\d+\.", "layers.*.", name)


def paths_by_type(report: Mapping[str, LayerChoice]) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for name, choice in report.items():
        out.setdefault(layer_type(name), Counter())[choice.path] += 1
    return out
