"""`prunedrive profile --model DIR`: fit a latency profile (harness.latency) to this machine's measured step times.

The model's agent decides a set of observations (models.data.synthetic_split: well-formed, no simulator); each
decision's wall time is measured `repeat` times (the median kept: a busy machine's spikes are not the model's)
with the tokens it read and wrote. A least-squares fit with non-negative terms maps them to
overhead + prefill ms per prompt token + decode ms per generated token; a term whose tokens never vary cannot be
told apart from the overhead and is folded into it (the profile says so). The file records the machine, its
load during the measurement and the fit's error; `measured: true`.
"""
from __future__ import annotations

import itertools
import os
import platform
import time
from pathlib import Path

import numpy as np
import yaml

TERMS = ("overhead_ms", "prefill_ms_per_token", "decode_ms_per_token")


def fit_terms(tokens_in: np.ndarray, tokens_out: np.ndarray, ms: np.ndarray) -> tuple[dict[str, float], list[str]]:
    """Non-negative least squares of ms ~ overhead + a x tokens_in + b x tokens_out (every subset of the terms
    tried: three columns, so exact). Returns the terms and the names of the ones folded into the overhead
    because their tokens never varied."""
    columns = {"overhead_ms": np.ones_like(ms), "prefill_ms_per_token": tokens_in, "decode_ms_per_token": tokens_out}
    folded = [name for name in TERMS[1:] if np.ptp(columns[name]) == 0]
    usable = [name for name in TERMS if name not in folded]
    best, best_error = {name: 0.0 for name in TERMS}, np.inf
    for size in range(1, len(usable) + 1):
        for subset in itertools.combinations(usable, size):
            design = np.stack([columns[name] for name in subset], axis=1)
            coefficients, *_ = np.linalg.lstsq(design, ms, rcond=None)
            if np.any(coefficients < 0):
                continue
            error = float(np.sum((design @ coefficients - ms) ** 2))
            if error < best_error:
                best, best_error = {**{name: 0.0 for name in TERMS}, **dict(zip(subset, map(float, coefficients)))}, error
    return best, folded


def measure(agent, observations: list, repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens_in, tokens_out, median wall ms) per observation."""
    tokens_in, tokens_out, ms = [], [], []
    for _ in range(3):  # warm-up: first calls allocate
        agent.act(observations[0])
    for observation in observations:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            agent.act(observation)
            times.append(1000.0 * (time.perf_counter() - started))
        report = agent.last_compute()
        tokens_in.append(float(report["tokens_in"]))
        tokens_out.append(float(report["tokens_out"]))
        ms.append(float(np.median(times)))
    return np.array(tokens_in), np.array(tokens_out), np.array(ms)


def profile_model(model: str | Path, out: str | Path, steps: int = 24, repeat: int = 3, seed: int = 0) -> dict:
    """Measure the model's agent on this machine and write the fitted profile to `out`; returns its fields."""
    from prunedrive.agents.registry import make_agent
    from prunedrive.models.data import synthetic_split
    from prunedrive.models.hf_causal import is_hf_causal_lm_dir

    if steps < 4 or repeat < 1:
        raise ValueError(f"--steps must be at least 4 and --repeat at least 1, got {steps} and {repeat}")
    model = Path(model)
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such model directory")
    out = Path(out)
    agent = make_agent("text-llm" if is_hf_causal_lm_dir(model) else "llm", model)
    split = synthetic_split(steps, seed=seed)
    load_before = os.getloadavg()[0]
    tokens_in, tokens_out, ms = measure(agent, [split.observation(i) for i in range(steps)], repeat)
    load_after = os.getloadavg()[0]
    terms, folded = fit_terms(tokens_in, tokens_out, ms)
    fitted = terms["overhead_ms"] + terms["prefill_ms_per_token"] * tokens_in + terms["decode_ms_per_token"] * tokens_out
    rmse = float(np.sqrt(np.mean((fitted - ms) ** 2)))
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'})"
    source = (f"measured by prunedrive profile on {machine}: model {model.name}, {steps} observations x {repeat}, "
              f"load average {load_before:.1f}-{load_after:.1f}; fit RMSE {rmse:.2f} ms "
              f"({100 * rmse / max(float(ms.mean()), 1e-9):.0f}% of the mean {ms.mean():.1f} ms)"
              + (f"; {', '.join(folded)} folded into the overhead (tokens never varied)" if folded else ""))
    fields = {"name": f"{platform.node() or 'this-machine'}-{model.name}", "source": source, "measured": True,
              **{name: round(value, 6) for name, value in terms.items()}, "ms_per_gflop": 0.0, "flops": "effective",
              "speed_factors": {"dense": 1.0, "sparse_kernel": 1.0}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(fields, sort_keys=False))
    return {**fields, "rmse_ms": rmse, "mean_ms": float(ms.mean())}
