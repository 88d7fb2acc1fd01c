"""Per-step compute: what the agent and the simulator spent, recorded for every step."""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class StepCompute:
    agent_wall_s: float = 0.0
    agent_cpu_s: float = 0.0       # process CPU time during act(): all threads
    sim_wall_s: float = 0.0        # backend step (simulator) wall time
    # Filled by model-backed agents (NaN otherwise).
    tokens_in: float = float("nan")
    tokens_out: float = float("nan")
    dense_flops: float = float("nan")
    effective_flops: float = float("nan")  # counting only non-zero weights
    executed_flops: float = float("nan")   # counting the weights the installed kernels multiply (dense path: all)
    params: float = float("nan")
    nonzero_params: float = float("nan")
    peak_mem_bytes: float = float("nan")   # the process's peak RSS (simulator and Python included)
    # On a CUDA device (NaN on the CPU): what the agent measured there itself, beside the runner's wall time.
    device_time_s: float = float("nan")          # the call's GPU time, CUDA events, synchronised (models.device)
    device_peak_mem_bytes: float = float("nan")  # torch.cuda.max_memory_allocated, reset per episode
    # 1 when the model's answer did not parse and the agent fell back to its safe action, else 0.
    parse_failed: float = float("nan")


COMPUTE_FIELDS = tuple(f.name for f in fields(StepCompute))
# Per-episode aggregates written to the episodes table.
AGGREGATED_FIELDS = ("agent_wall_s", "agent_cpu_s", "sim_wall_s", "tokens_in", "tokens_out",
                     "dense_flops", "effective_flops", "executed_flops", "device_time_s")


def aggregate(columns: dict[str, np.ndarray]) -> dict[str, float]:
    """mean, p50 and p95 of each aggregated field over an episode's steps, plus model sizes."""
    out: dict[str, float] = {}
    for name in AGGREGATED_FIELDS:
        values = np.asarray(columns[name], np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            out[f"{name}_mean"] = out[f"{name}_p50"] = out[f"{name}_p95"] = float("nan")
            continue
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_p50"], out[f"{name}_p95"] = (float(v) for v in np.percentile(values, [50, 95]))
    for name in ("params", "nonzero_params", "peak_mem_bytes", "device_peak_mem_bytes"):
        values = np.asarray(columns[name], np.float64)
        values = values[np.isfinite(values)]
        out[name] = float(values.max()) if len(values) else float("nan")
    out.update(parse_counts(columns["parse_failed"]))
    return out


def parse_counts(parse_failed) -> dict[str, float]:
    """The episode's `parse_failures` (answers that did not parse: fallback actions) and `model_decisions`
    (steps a model decided): NaN for both when no step reports it (an agent without a model), so a
    model-free agent never reads as one that always parsed."""
    values = np.asarray(parse_failed, np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"parse_failures": float("nan"), "model_decisions": float("nan")}
    return {"parse_failures": float(values.sum()), "model_decisions": float(len(values))}


def apportion(rows: list[dict[str, float]], totals: dict[str, float]) -> None:
    """Split a batched call's FLOPs (`totals`, per FLOP field) over its rows in proportion to what each row
    would have cost alone (its own report's value, replaced here), so the rows sum to what the call computed.
    Rows that would have cost nothing share equally."""
    for field in ("dense_flops", "effective_flops", "executed_flops"):
        weight = np.array([report[field] for report in rows], np.float64)
        shares = weight / weight.sum() if weight.sum() > 0 else np.full(len(rows), 1.0 / len(rows))
        for report, share in zip(rows, shares):
            report[field] = float(totals[field] * share)


def split_device_time(rows: list[dict[str, float]], seconds: float) -> None:
    """A batched call's device time (NaN: none measured) over its rows, as `apportion` split its FLOPs: in
    proportion to each row's dense_flops, equal shares where those are all zero."""
    weight = np.array([report.get("dense_flops", 0.0) for report in rows], np.float64)
    shares = weight / weight.sum() if weight.sum() > 0 else np.full(len(rows), 1.0 / max(len(rows), 1))
    for report, share in zip(rows, shares):
        report["device_time_s"] = float(seconds * share)
