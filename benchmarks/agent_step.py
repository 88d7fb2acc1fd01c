"""Does pruning pay? Per-step latency, tokens/s and memory of the driving-LLM agent, dense vs pruned, with
honest speed-up accounting: what each variant stores, what it multiplies, and what that buys in time.

    python benchmarks/agent_step.py [--model DIR] [--repeats 20] [--tokens 20] [--batches 1 16] [--threads 1]
                                    [--csv PATH] [--device cpu|cuda|cuda:N] [--dtype float32|bfloat16|float16]

On a GPU (`--device cuda --dtype bfloat16 --no-rss`): every variant is built and pruned on the CPU, then runs on
the device in the dtype (LLMAgent(device=, dtype=)); each step is timed with CUDA events, synchronised
(models.device.DeviceClock), not CPU wall time; the Amdahl hooks synchronise around every nn.Linear; the sparse
executions choose among dense, csr, ell and 2:4 semi-structured by measuring them on the device at the agent's
own row counts (2:4 is installed only where it measured faster).

Variants of the same dense model:
- unstructured: magnitude-pruned copies of its LM decoder layers at 50/70% and 2:4 (latency depends on the
  sparsity pattern, not on which method chose it: Wanda's or OWL's masks time the same). Every one runs twice:
  "masked" (the zeroed dense weights through F.linear, what a pruned agent does today: dense kernels, the zeros
  are multiplied, no speed-up) and "sparse" (LLMAgent(sparse="auto"): each pruned Linear on the path
  models/sparse_linear.py measured fastest);
- structured (models.pruning.structured, depth): "width50" removes 50% of every block's MLP channels and
  key-value groups (Wanda-sp, uniform: 50% of the LM's prunable parameters), "depth25" removes 25% of the
  decoder blocks (ShortGPT block influence). Both are smaller dense models on dense kernels. Their calibration is
  16 synthetic observations (models.data.synthetic_split): which channels or blocks go does not change the shapes,
  so it does not change the time.
All executions run in one process, interleaved round-robin over repeats with a rotating start (the machine
is shared and noisy), on the same observations and prompt, at every batch size K of --batches (K episodes
decoded together, as LLMAgent.act_batch does with --batch K); ratios are to dense at the same K.

A step = collate + encoder + LM prefill + greedy decode of exactly --tokens tokens (no stop at eos or at
"Reason"), so every variant generates the same number of tokens even from random or badly pruned weights.
Without --model the weights are a random `small` preset model (as benchmarks/llm_presets.py builds it).

Per row: the device, K, parameters stored (zeros included), non-zeros, the LM's prunable (decoder-block linear)
parameters stored, and as ratios to dense: p50 / p95 step latency, tokens/s (generated tokens / total wall), weight bytes
of the executed formats (parameters, with each sparse-path weight counted in its packed format), and peak
RSS of the variant alone in a fresh subprocess (ru_maxrss only grows within a process, so it is useless
for comparing variants run one after another in one); then the paired ratio (per round, the step over dense's
step of the same round and K, median over rounds: what the "buys" column and issue 28's targets use, since a
burst of load on a shared machine falls on both) and the fastest-step ratio. Outputs of each sparse execution are
checked against its masked one: same generated tokens, max |logit difference|.

Amdahl: the share of the dense step spent inside nn.Linear forward calls (timing hooks), and the best
step ratio reachable if the pruned linears ran at 0.3x their dense time while everything else stayed.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prunedrive.agents.llm import LLMAgent
from prunedrive.models import text
from prunedrive.models.data import synthetic_split
from prunedrive.models.device import DeviceClock, check_precision, is_cuda
from prunedrive.models.driving_llm import DrivingLLM, collate
from prunedrive.models.presets import PRESETS
from prunedrive.models.data import lm_calibration_samples
from prunedrive.models.pruning import find_linears, prune, prune_magnitude
from prunedrive.models.pruning.surgery import block_widths
from prunedrive.models.sparse_linear import SparseLinear, layer_type, storage_bytes
from prunedrive.app.train import untrained_model

PRUNED = {"u50": (0.5, None), "u70": (0.7, None), "2:4": (None, "2:4")}  # unstructured: masks
STRUCTURED = {"width50": ("width", 0.5), "depth25": ("depth", 0.25)}   # structured: smaller dense models
TARGET_LINEAR_RATIO = 0.3  # the Amdahl "what if": pruned linears at 0.3x their dense time
NO_SPEEDUP = 0.95  # a paired ratio above this is "no speed-up": within the noise of a shared machine
# Issue 28's targets for the structured variants on this CPU: {variant: {K: the largest p50 ratio to dense}}.
TARGETS = {"width50": {1: 0.9, 16: 0.75}, "depth25": {1: 0.85, 16: 0.85}}
CALIBRATION_ROWS = 16


# -- the model and the step ---------------------------------------------------------------------------
def base_model(model_dir: str | None) -> DrivingLLM:
    if model_dir:
        return DrivingLLM.from_pretrained(model_dir).eval()
    return untrained_model(PRESETS["small"], synthetic_split(64))


def calibration(base: DrivingLLM) -> list[dict]:
    """The structured variants' calibration: LM inputs of synthetic observations (shapes, not choices, set the time)."""
    return lm_calibration_samples(base, synthetic_split(CALIBRATION_ROWS, seed=5), n_samples=CALIBRATION_ROWS)


def make_agent(base: DrivingLLM, variant: str, execution: str, tokens: int,
               samples: list[dict] | None = None, device: str = "cpu", dtype: str = "float32") -> LLMAgent:
    model = copy.deepcopy(base)
    if variant in STRUCTURED:
        method, ratio = STRUCTURED[variant]
        with torch.no_grad():
            prune(model.lm, method, ratio, calibration=samples or calibration(base))
        model.config.lm = model.lm.config.to_dict()  # as app.prune_driving does: the smaller LM's config
    elif variant != "dense":
        sparsity, pattern = PRUNED[variant]
        prune_magnitude(model.lm, sparsity, pattern)
    return LLMAgent(model, name=f"{variant}-{execution}", max_new_tokens=tokens,
                    sparse="auto" if execution == "sparse" else "dense", device=device, dtype=dtype)


@torch.no_grad()
def step(model: DrivingLLM, observations, prompt: str, tokens: int, keep_logits: bool = False):
    """What LLMAgent.act (one observation) or act_batch (a list: K rows, one shared prompt, one KV cache) runs
    through DrivingLLM.generate, minus the early stops: exactly `tokens` greedy tokens per row. Returns the first
    row's tokens (and logits with keep_logits)."""
    rows = observations if isinstance(observations, list) else [observations]
    device = model.token_weight.device
    obs = {k: v.to(device) for k, v in collate(rows).items()}
    ids = torch.tensor([model.prompt_ids(prompt)] * len(rows), device=device)
    inputs = model.lm_inputs(obs, ids)
    mask, embed = inputs["attention_mask"], model.lm.get_input_embeddings()
    out = model.lm(**inputs, use_cache=True, logits_to_keep=1)
    generated, logits = [], []
    for t in range(tokens):
        last = out.logits[:, -1]
        token = last.argmax(-1)
        generated.append(int(token[0]))
        if keep_logits:
            logits.append(last[0].clone())
        if t == tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=device)], 1)
        out = model.lm(inputs_embeds=embed(token[:, None]), attention_mask=mask, cache=out.cache,
                       use_cache=True)
    return generated, (torch.stack(logits) if keep_logits else None)


def batch_of(observations: list, k: int, start: int = 0) -> list:
    """K observations (cycling over the pool), starting at `start`: K different episodes' steps."""
    return [observations[(start + j) % len(observations)] for j in range(k)]


def stored_counts(model: DrivingLLM) -> dict:
    """What the variant stores: all unique parameters and their non-zeros, and the LM's prunable part (the decoder
    blocks' linears: what width and the unstructured masks act on; depth removes whole blocks)."""
    unique = {id(p): p for p in model.parameters()}.values()
    prunable = find_linears(model.lm.model.layers).values()
    return {"params": sum(p.numel() for p in unique),
            "nonzero_params": sum(int(torch.count_nonzero(p)) for p in unique),
            "prunable_params": sum(lin.weight.numel() for lin in prunable),
            "prunable_nonzero": sum(int(torch.count_nonzero(lin.weight)) for lin in prunable)}


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

    cuda = model.token_weight.is_cuda  # asynchronous kernels: synchronise, or the hooks time the launches

    def pre(mod, inp):
        if cuda:
            torch.cuda.synchronize()
        started[id(mod)] = time.perf_counter()

    def post(mod, inp, out):
        if cuda:
            torch.cuda.synchronize()
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
    agent = make_agent(base, variant, execution, args.tokens, device=args.device, dtype=args.dtype)
    del base  # the pruned copy is what the variant keeps
    observations = [synthetic_split(4, seed=3).observation(i) for i in range(4)]
    for obs in observations:
        step(agent.model, obs, agent.prompt, args.tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_rss_bytes": peak}


def measure_rss(args, model_dir: str, variant: str, execution: str) -> float:
    cmd = [sys.executable, __file__, "--child", f"{variant}/{execution}", "--tokens", str(args.tokens),
           "--threads", str(args.threads), "--model", model_dir, "--device", args.device, "--dtype", args.dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode:
        print(f"  rss child {variant}/{execution} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return float("nan")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


# -- main ---------------------------------------------------------------------------------------------
def variant_sparsity(variant: str) -> dict:
    """sparsity: the share of weights zeroed (unstructured), of width (width) or of blocks (depth) removed."""
    if variant in STRUCTURED:
        return {"sparsity": STRUCTURED[variant][1], "pattern": STRUCTURED[variant][0]}
    sparsity, pattern = PRUNED.get(variant, (0.0, None))
    return {"sparsity": 0.5 if pattern == "2:4" else sparsity, "pattern": pattern or ""}


def execution_path(variant: str, execution: str, agent: LLMAgent, base_blocks: int) -> str:
    """How the variant's layers execute, in one phrase: where zeros are multiplied the table says so."""
    if variant == "dense":
        return "dense kernels (F.linear)"
    if variant in STRUCTURED:
        widths = block_widths(agent.model.lm)
        if STRUCTURED[variant][0] == "depth":
            return f"dense kernels, {len(widths)} of {base_blocks} blocks"
        mlp = sorted({w["intermediate_size"] for w in widths})
        heads = sorted({w["num_attention_heads"] for w in widths})
        return f"dense kernels, smaller: mlp {'/'.join(map(str, mlp))}, heads {'/'.join(map(str, heads))} per block"
    if execution == "masked" or not any(p != "dense" for p in agent.paths.values()):
        return "dense kernels: no speed-up (zeros multiplied)"
    chosen = {}
    for path in agent.paths.values():
        chosen[path] = chosen.get(path, 0) + 1
    return "sparse paths: " + ", ".join(f"{p} x{n}" for p, n in chosen.items())


def device_text(device: str, dtype: str, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    card = f"{torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}, " if is_cuda(device) else ""
    return (f"{device} {dtype} ({card}{cpu}, torch {torch.__version__}, {threads} CPU "
            f"thread{'s' if threads > 1 else ''})")


def timed_step(model: DrivingLLM, rows, prompt: str, tokens: int, device: str) -> float:
    """Seconds of one step: CUDA events around it, synchronised, on a GPU; wall time on the CPU."""
    with DeviceClock(device) as clock:
        start = time.perf_counter()
        step(model, rows, prompt, tokens)
        wall = time.perf_counter() - start
    return clock.seconds if is_cuda(device) else wall


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


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def speedup_text(ratio: float, path: str) -> str:
    """What pruning bought in time. A variant that runs the dense kernels on its zeroed weights executes exactly the
    dense model's arithmetic: its ratio is noise, and it buys nothing, whatever this run's draw says."""
    if "no speed-up" in path or ratio > NO_SPEEDUP:
        return "no speed-up"
    return f"{1 / ratio:.2f}x faster"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'variant':8s} {'exec':7s} {'K':>3s} {'params':>6s} {'nonzero':>7s} {'prunable':>8s} {'p50 ms':>7s} "
          f"{'p95 ms':>7s} {'tok/s':>6s} | x dense: {'p50':>5s} {'p95':>5s} {'tok/s':>5s} {'weights':>7s} {'rss':>5s} | "
          f"{'paired':>6s} {'min':>5s} | {'buys':15s} | sparse/pruned layers  same tokens  max|dlogit|")
    for r in rows:
        same = "yes" if r["same_tokens"] else "NO"
        check = "" if r["execution"] != "sparse" else f"{same:>11s}  {r['max_logit_diff']:.1e}"
        print(f"{r['variant']:8s} {r['execution']:7s} {r['batch']:3d} {_millions(r['params']):>6s} "
              f"{_millions(r['nonzero_params']):>7s} {_millions(r['prunable_params']):>8s} "
              f"{r['p50_ms']:7.1f} {r['p95_ms']:7.1f} {r['tokens_per_s']:6.0f} | "
              f"{'':9s}{r['p50_ms_ratio']:5.2f} {r['p95_ms_ratio']:5.2f} {r['tokens_per_s_ratio']:5.2f} "
              f"{r['weight_bytes_ratio']:7.2f} {r['peak_rss_bytes_ratio']:5.2f} {r['paired_ratio']:6.2f} "
              f"{r['min_ratio']:5.2f} | {r['speedup']:15s} | "
              f"{r['sparse_layers']:>9d}/{r['pruned_layers']:<10d} {check}")


def print_targets(rows: list[dict]) -> None:
    """Issue 28's step-time targets for the structured variants, each met or not, from this run's ratios."""
    print("\nissue 28 targets (paired step-time ratio to dense, same K, this run; the fastest-step ratio beside):")
    for variant, limits in TARGETS.items():
        for k, limit in limits.items():
            row = next((r for r in rows if r["variant"] == variant and r["batch"] == k), None)
            if row is None:
                print(f"  {variant} K={k}: <= {limit:.2f}x  not measured (K={k} not in --batches)")
                continue
            verdict = "met" if row["paired_ratio"] <= limit else "NOT met"
            print(f"  {variant} K={k}: {row['paired_ratio']:.2f}x (fastest {row['min_ratio']:.2f}x; target <= "
                  f"{limit:.2f}x): {verdict}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trained dense model directory (default: random-weight small preset)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per execution and batch size")
    p.add_argument("--tokens", type=int, default=20, help="generated tokens per step (forced)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16],
                   help="batch sizes K: K episodes decoded together, as act_batch does (default 1 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--csv", help="write the table here")
    p.add_argument("--no-rss", action="store_true", help="skip the per-variant subprocesses for peak RSS")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (models.device)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 (a GPU only)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.device, args.dtype = check_precision(args.device, args.dtype)
    except ValueError as exc:
        p.error(str(exc))
    if any(k < 1 for k in args.batches):
        p.error(f"--batches: batch sizes are whole numbers >= 1, got {args.batches}")
    if args.child:
        print(json.dumps(child_rss(args, *args.child.split("/"))))
        return []
    torch.set_num_threads(args.threads)

    base = base_model(args.model)
    observations = [synthetic_split(max(args.batches), seed=3).observation(i) for i in range(max(args.batches))]
    prompt = text.prompt("action")
    runs = ([("dense", "masked")] + [(v, e) for v in PRUNED for e in ("masked", "sparse")]
            + [(v, "dense") for v in STRUCTURED])
    device = device_text(args.device, args.dtype, args.threads)
    print(f"model: {args.model or 'random small preset'}  LM params {base.num_parameters()['lm']:,}  "
          f"tokens in {base.prefix_tokens + len(base.prompt_ids(prompt))}, out {args.tokens}  "
          f"batch sizes {args.batches}  repeats {args.repeats}\ndevice: {device}")
    t0 = time.perf_counter()
    samples = calibration(base)
    agents = {run: make_agent(base, *run, args.tokens, samples, args.device, args.dtype) for run in runs}
    print(f"built, pruned and accelerated {len(runs)} executions in {time.perf_counter() - t0:.1f} s")

    # Correctness: the sparse execution must generate what its masked twin generates.
    check = {}
    for v in PRUNED:
        ids_m, logits_m = step(agents[v, "masked"].model, observations[0], prompt, args.tokens, keep_logits=True)
        ids_s, logits_s = step(agents[v, "sparse"].model, observations[0], prompt, args.tokens, keep_logits=True)
        check[v] = (ids_m == ids_s, float((logits_m - logits_s).abs().max()))

    # Every (execution, K) in one rotation, so a burst of load falls on all of them alike.
    timed = [(run, k) for k in args.batches for run in runs]
    times = {key: [] for key in timed}
    for run, k in timed:  # warm-up
        step(agents[run].model, batch_of(observations, k), prompt, args.tokens)
    for i in range(args.repeats):
        for run, k in timed[i % len(timed):] + timed[: i % len(timed)]:  # rotate who goes first
            rows_in = batch_of(observations, k, i)
            times[run, k].append(timed_step(agents[run].model, rows_in, prompt, args.tokens, args.device))

    amdahl = linear_share(agents["dense", "masked"].model, observations, prompt, args.tokens, max(args.repeats, 3))
    rss = {run: float("nan") for run in runs}
    if not args.no_rss:
        # Children load the saved base model: building the random one (data + tokenizer training) would set a
        # peak of its own that hides the variant's.
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model or str(base.save_pretrained(Path(tmp) / "base"))
            for run in runs:
                rss[run] = measure_rss(args, model_dir, *run)

    base_blocks = base.lm.config.num_hidden_layers
    rows = []
    for run, k in timed:
        t = np.asarray(times[run, k])
        agent = agents[run]
        same, diff = check.get(run[0], (True, 0.0)) if run[1] == "sparse" else (True, 0.0)
        rows.append({
            "variant": run[0], "execution": run[1], "batch": k, "device": device,
            **variant_sparsity(run[0]), **stored_counts(agent.model),
            "path": execution_path(run[0], run[1], agent, base_blocks),
            "p50_ms": 1e3 * float(np.percentile(t, 50)), "p95_ms": 1e3 * float(np.percentile(t, 95)),
            "tokens_per_s": args.tokens * k * len(t) / float(t.sum()),
            "weight_bytes": weight_bytes(agent.model), "peak_rss_bytes": rss[run],
            "sparse_layers": sum(p != "dense" for p in agent.paths.values()), "pruned_layers": len(agent.paths),
            "same_tokens": same, "max_logit_diff": diff,
        })
    for r in rows:
        ref = next(d for d in rows if d["variant"] == "dense" and d["batch"] == r["batch"])
        for key in ("p50_ms", "p95_ms", "tokens_per_s", "weight_bytes", "peak_rss_bytes"):
            r[f"{key}_ratio"] = r[key] / ref[key]
        # Paired: each round's step over dense's step of the same round and K (seconds apart, so a burst of load
        # falls on both), median over rounds; and the fastest step over dense's fastest (least disturbed by load).
        mine, dense = np.asarray(times[(r["variant"], r["execution"]), r["batch"]]), np.asarray(times[runs[0], r["batch"]])
        r["paired_ratio"] = float(np.median(mine / dense))
        r["min_ratio"] = float(mine.min() / dense.min())
        r["speedup"] = "(reference)" if r["variant"] == "dense" else speedup_text(r["paired_ratio"], r["path"])

    print_table(rows)
    ref = rows[0]
    print(f"\ndense: weights {ref['weight_bytes'] / 2**20:.2f} MiB, peak RSS {ref['peak_rss_bytes'] / 2**20:.0f} MiB. "
          "Sparse paths also keep the dense master weight (weight semantics), which RSS includes. params: stored "
          "(zeros included); prunable: the LM's decoder-block linears. paired: median over rounds of the step "
          "time over dense's in the same round; min: fastest step over dense's fastest. 'no speed-up': paired "
          f"ratio above {NO_SPEEDUP}, or dense kernels multiplying the zeros.")

    print(f"\nexecution path per variant (device {device}):")
    for run in runs:
        print(f"  {run[0]:8s} {run[1]:7s} {execution_path(run[0], run[1], agents[run], base_blocks)}")
    print("\nchosen paths per layer type (sparse executions):")
    for v in PRUNED:
        print(f"  {v}:")
        print("\n".join(describe_paths(agents[v, "sparse"])) or "    (no pruned layers)")
    print_targets(rows)

    print(f"\nAmdahl (dense step, K=1, hooks on every nn.Linear): {100 * amdahl['share_all']:.0f}% of the step is "
          f"inside nn.Linear forwards, {100 * amdahl['share_pruned']:.0f}% inside the prunable decoder ones.")
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
