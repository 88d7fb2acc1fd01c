"""Does sparsity pay? Per-step latency, tokens/s and memory of the driving-LLM agent, dense vs pruned.

    python benchmarks/agent_step.py [--model DIR] [--repeats 30] [--tokens 20] [--threads 1] [--csv PATH]

Variants: dense, and magnitude-pruned copies of its LM decoder layers at 50/70/90% unstructured and 2:4
(latency depends on the sparsity pattern, not on which method chose it). Every pruned variant runs twice:
"masked" (the zeroed dense weights through F.linear, what a pruned agent does today) and "sparse"
(LLMAgent(sparse="auto"): each pruned Linear on the path models/sparse_linear.py measured fastest).
All executions run in one process, interleaved round-robin over repeats with a rotating start (the machine
is shared and noisy), on the same observations and prompt.

A step = collate + encoder + LM prefill + greedy decode of exactly --tokens tokens (no stop at eos or at
"Reason"), so every variant generates the same number of tokens even from random or badly pruned weights.
Without --model the weights are a random `small` preset model (as benchmarks/llm_presets.py builds it).

Columns, as ratios to dense: p50 / p95 step latency, tokens/s (generated tokens / total wall), weight bytes
of the executed formats (parameters, with each sparse-path weight counted in its packed format), and peak
RSS of the variant alone in a fresh subprocess (ru_maxrss only grows within a process, so it is useless
for comparing variants run one after another in one). Outputs of each sparse execution are checked
against its masked one: same generated tokens, max |logit difference|.

Amdahl: the share of the dense step spent inside nn.Linear forward calls (timing hooks), and the best
step ratio reachable if the pruned linears ran at 0.3x their dense time while everything else stayed.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunedrive.agents.llm import LLMAgent  # noqa: E402
from prunedrive.models import text  # noqa: E402
from prunedrive.models.data import synthetic_split  # noqa: E402
from prunedrive.models.driving_llm import DrivingLLM, collate  # noqa: E402
from prunedrive.models.presets import PRESETS  # noqa: E402
from prunedrive.models.pruning import find_linears, prune_magnitude  # noqa: E402
from prunedrive.models.sparse_linear import SparseLinear, layer_type, storage_bytes  # noqa: E402
from prunedrive.app.train import untrained_model  # noqa: E402

PRUNED = {"u50": (0.5, None), "u70": (0.7, None), "u90": (0.9, None), "2:4": (None, "2:4")}
TARGET_LINEAR_RATIO = 0.3  # the Amdahl "what if": pruned linears at 0.3x their dense time


# -- the model and the step ---------------------------------------------------------------------------
def base_model(model_dir: str | None) -> DrivingLLM:
    if model_dir:
        return DrivingLLM.from_pretrained(model_dir).eval()
    return untrained_model(PRESETS["small"], synthetic_split(64))


def make_agent(base: DrivingLLM, variant: str, execution: str, tokens: int) -> LLMAgent:
    model = copy.deepcopy(base)
    if variant != "dense":
        sparsity, pattern = PRUNED[variant]
        prune_magnitude(model.lm, sparsity, pattern)
    return LLMAgent(model, name=f"{variant}-{execution}", max_new_tokens=tokens,
                    sparse="auto" if execution == "sparse" else "dense")


@torch.no_grad()
def step(model: DrivingLLM, observation: dict, prompt: str, tokens: int, keep_logits: bool = False):
    """What LLMAgent.act runs (DrivingLLM.generate), minus the early stops: exactly `tokens` greedy tokens."""
    obs = collate([observation])
    ids = torch.tensor([model.prompt_ids(prompt)])
    inputs = model.lm_inputs(obs, ids)
    mask, embed = inputs["attention_mask"], model.lm.get_input_embeddings()
    out = model.lm(**inputs, use_cache=True, logits_to_keep=1)
    generated, logits = [], []
    for t in range(tokens):
        last = out.logits[:, -1]
        token = last.argmax(-1)
        generated.append(int(token))
        if keep_logits:
            logits.append(last[0].clone())
        if t == tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        out = model.lm(inputs_embeds=embed(token[:, None]), attention_mask=mask, cache=out.cache,
                       use_cache=True)
    return generated, (torch.stack(logits) if keep_logits else None)


def weight_bytes(model: DrivingLLM) -> int:
    """All unique parameters, each sparse-path Linear weight counted in its executed (packed) format."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    for lin in find_linears(model, ()).values():
        if isinstance(lin, SparseLinear) and lin.path != "dense":
            total += storage_bytes(lin) - lin.weight.numel() * lin.weight.element_size()
    return total


# -- Amdahl -------------------------------------------------------------------------------------------
def linear_share(model: DrivingLLM, observations: list, prompt: str, tokens: int, repeats: int) -> dict:
    """Share of the step's wall time inside nn.Linear forwards (all of them, and the prunable ones)."""
    spent = {"all": 0.0, "pruned": 0.0}
    prunable = set(map(id, find_linears(model.lm.model.layers).values()))
    started: dict[int, float] = {}

    def pre(mod, inp):
        started[id(mod)] = time.perf_counter()

    def post(mod, inp, out):
        dt = time.perf_counter() - started[id(mod)]
        spent["all"] += dt
        if id(mod) in prunable:
            spent["pruned"] += dt

    linears = find_linears(model, ()).values()
    hooks = [h for lin in linears for h in (lin.register_forward_pre_hook(pre), lin.register_forward_hook(post))]
    try:
        step(model, observations[0], prompt, tokens)
        spent.update(all=0.0, pruned=0.0)
        wall = time.perf_counter()
        for i in range(repeats):
            step(model, observations[i % len(observations)], prompt, tokens)
        wall = time.perf_counter() - wall
    finally:
        for h in hooks:
            h.remove()
    share_all, share_pruned = spent["all"] / wall, spent["pruned"] / wall
    return {"share_all": share_all, "share_pruned": share_pruned,
            "best_ratio": 1 - share_pruned * (1 - TARGET_LINEAR_RATIO)}


# -- peak RSS, one variant per process ----------------------------------------------------------------
def child_rss(args, variant: str, execution: str) -> dict:
    """Build, (accelerate,) and step one variant alone; report its peak RSS (run in a subprocess)."""
    torch.set_num_threads(args.threads)
    base = base_model(args.model)
    agent = make_agent(base, variant, execution, args.tokens)
    del base  # the pruned copy is what the variant keeps
    observations = [synthetic_split(4, seed=3).observation(i) for i in range(4)]
    for obs in observations:
        step(agent.model, obs, agent.prompt, args.tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_rss_bytes": peak}


def measure_rss(args, model_dir: str, variant: str, execution: str) -> float:
    cmd = [sys.executable, __file__, "--child", f"{variant}/{execution}", "--tokens", str(args.tokens),
           "--threads", str(args.threads), "--model", model_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode:
        print(f"  rss child {variant}/{execution} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return float("nan")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


# -- main ---------------------------------------------------------------------------------------------
def variant_sparsity(variant: str) -> dict:
    sparsity, pattern = PRUNED.get(variant, (0.0, None))
    return {"sparsity": 0.5 if pattern == "2:4" else sparsity, "pattern": pattern or ""}


def describe_paths(agent: LLMAgent) -> list[str]:
    """Per layer type: the chosen paths, and how the best sparse candidate's measured cost compares to dense."""
    lines, groups = [], {}
    for name, choice in agent.path_report.items():
        groups.setdefault(layer_type(name), []).append(choice)
    for kind, choices in groups.items():
        chosen = {}
        for c in choices:
            chosen[c.path] = chosen.get(c.path, 0) + 1
        ratios = [min(v for p, v in c.cost_us.items() if p != "dense") / c.cost_us["dense"]
                  for c in choices if len(c.cost_us) > 1]
        best = f"best sparse / dense cost {np.median(ratios):.2f}x" if ratios else "no sparse candidate ran"
        lines.append(f"    {kind:42s} {', '.join(f'{p} x{n}' for p, n in chosen.items()):22s} ({best})")
    return lines


def print_table(rows: list[dict]) -> None:
    print(f"\n{'variant':8s} {'exec':7s} {'p50 ms':>7s} {'p95 ms':>7s} {'tok/s':>6s} | x dense: {'p50':>5s} "
          f"{'p95':>5s} {'tok/s':>5s} {'weights':>7s} {'rss':>5s} | sparse/pruned layers  same tokens  max|dlogit|")
    for r in rows:
        same = "yes" if r["same_tokens"] else "NO"
        check = "" if r["execution"] == "masked" else f"{same:>11s}  {r['max_logit_diff']:.1e}"
        print(f"{r['variant']:8s} {r['execution']:7s} {r['p50_ms']:7.1f} {r['p95_ms']:7.1f} {r['tokens_per_s']:6.0f} | "
              f"{'':9s}{r['p50_ms_ratio']:5.2f} {r['p95_ms_ratio']:5.2f} {r['tokens_per_s_ratio']:5.2f} "
              f"{r['weight_bytes_ratio']:7.2f} {r['peak_rss_bytes_ratio']:5.2f} | "
              f"{r['sparse_layers']:>9d}/{r['pruned_layers']:<10d} {check}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trained dense model directory (default: random-weight small preset)")
    p.add_argument("--repeats", type=int, default=30, help="timed steps per execution")
    p.add_argument("--tokens", type=int, default=20, help="generated tokens per step (forced)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--csv", help="write the table here")
    p.add_argument("--no-rss", action="store_true", help="skip the per-variant subprocesses for peak RSS")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_rss(args, *args.child.split("/"))))
        return []
    torch.set_num_threads(args.threads)

    base = base_model(args.model)
    observations = [synthetic_split(4, seed=3).observation(i) for i in range(4)]
    prompt = text.prompt("action")
    runs = [("dense", "masked")] + [(v, e) for v in PRUNED for e in ("masked", "sparse")]
    print(f"model: {args.model or 'random small preset'}  LM params {base.num_parameters()['lm']:,}  "
          f"tokens in {base.prefix_tokens + len(base.prompt_ids(prompt))}, out {args.tokens}  "
          f"threads {args.threads}  repeats {args.repeats}")
    t0 = time.perf_counter()
    agents = {run: make_agent(base, *run, args.tokens) for run in runs}
    print(f"built and accelerated {len(runs)} executions in {time.perf_counter() - t0:.1f} s")

    # Correctness: the sparse execution must generate what its masked twin generates.
    check = {}
    for v in PRUNED:
        ids_m, logits_m = step(agents[v, "masked"].model, observations[0], prompt, args.tokens, keep_logits=True)
        ids_s, logits_s = step(agents[v, "sparse"].model, observations[0], prompt, args.tokens, keep_logits=True)
        check[v] = (ids_m == ids_s, float((logits_m - logits_s).abs().max()))

    times = {run: [] for run in runs}
    for run in runs:  # warm-up
        step(agents[run].model, observations[0], prompt, args.tokens)
    for i in range(args.repeats):
        obs = observations[i % len(observations)]
        for run in runs[i % len(runs):] + runs[: i % len(runs)]:  # rotate who goes first
            start = time.perf_counter()
            step(agents[run].model, obs, prompt, args.tokens)
            times[run].append(time.perf_counter() - start)

    amdahl = linear_share(agents["dense", "masked"].model, observations, prompt, args.tokens, max(args.repeats, 3))
    rss = {run: float("nan") for run in runs}
    if not args.no_rss:
        # Children load the saved base model: building the random one (data + tokenizer training) would set a
        # peak of its own that hides the variant's.
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model or str(base.save_pretrained(Path(tmp) / "base"))
            for run in runs:
                rss[run] = measure_rss(args, model_dir, *run)

    rows = []
    for run in runs:
        t = np.asarray(times[run])
        agent = agents[run]
        same, diff = check.get(run[0], (True, 0.0)) if run[1] == "sparse" else (True, 0.0)
        rows.append({
            "variant": run[0], "execution": run[1],
            **variant_sparsity(run[0]),
            "p50_ms": 1e3 * float(np.percentile(t, 50)), "p95_ms": 1e3 * float(np.percentile(t, 95)),
            "tokens_per_s": args.tokens * len(t) / float(t.sum()),
            "weight_bytes": weight_bytes(agent.model), "peak_rss_bytes": rss[run],
            "sparse_layers": sum(p != "dense" for p in agent.paths.values()), "pruned_layers": len(agent.paths),
            "same_tokens": same, "max_logit_diff": diff,
        })
    ref = rows[0]
    for r in rows:
        for key in ("p50_ms", "p95_ms", "tokens_per_s", "weight_bytes", "peak_rss_bytes"):
            r[f"{key}_ratio"] = r[key] / ref[key]

    print_table(rows)
    print(f"\ndense: weights {ref['weight_bytes'] / 2**20:.2f} MiB, peak RSS {ref['peak_rss_bytes'] / 2**20:.0f} MiB. "
          "Sparse paths also keep the dense master weight (weight semantics), which RSS includes.")

    print("\nchosen paths per layer type (sparse executions):")
    for v in PRUNED:
        print(f"  {v}:")
        print("\n".join(describe_paths(agents[v, "sparse"])) or "    (no pruned layers)")

    print(f"\nAmdahl (dense step, hooks on every nn.Linear): {100 * amdahl['share_all']:.0f}% of the step is inside "
          f"nn.Linear forwards, {100 * amdahl['share_pruned']:.0f}% inside the prunable decoder ones.")
    print(f"  if those ran at {TARGET_LINEAR_RATIO}x their dense time, the step would be at best "
          f"{amdahl['best_ratio']:.2f}x dense (issue target for 70% sparse: <= 0.60x, which needs a share >= "
          f"{0.4 / (1 - TARGET_LINEAR_RATIO):.0%}).")

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
