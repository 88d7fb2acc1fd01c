"""LLM-agent throughput with lockstep batches: episodes per hour and env-steps per second for K = 1, 4, 8, 16.

    python benchmarks/throughput.py                                    # untrained `small`, standard suite, 2 seeds
    python benchmarks/throughput.py --model ~/.cache/prunedrive/models/small-<hash> --seeds 4 --workers 1 2 --repeat 2

    python benchmarks/throughput.py --agent text-llm --model ~/.cache/prunedrive/models/text-small-<hash>

Every K drives the same episodes (the first --seeds seeds of every scenario of --suite) with the LLM agent
through the runner (harness.runner.run_suite, in-process; `--workers N` > 1: Ray actors), one after another
in this process, and is reported as a ratio to K = 1 measured in the same run. A step's wall time is split
into simulator (the backend's step), agent (act / act_batch) and harness (the rest: the env wrapper,
criteria, bookkeeping, batching, results). Also: whether each K's per-episode results equal K = 1's; the
agent's time per step against what its executed FLOPs would take at the machine's measured matmul speed
(how far batch-1 decoding is from the hardware, and how much of that a batch wins back); and (--tokens N)
how often the answers of act_batch with K = 8 differ from act()'s on N observations the expert drove through.

Timings depend on the machine's load: on a shared machine run it twice, or compare ratios only.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prunedrive.agents.llm import LLMAgent
from prunedrive.agents.text_llm import TextLLMAgent
from prunedrive.harness.results import RunDir
from prunedrive.harness.executors import InProcessExecutor
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import Suite, load_suite

RESULT_COLUMNS = ["scenario", "seed", "status", "driving_score", "route_completion", "steps", "events"]


def subset(suite: Suite, seeds: int | None, scenarios: list[str] | None) -> Suite:
    from dataclasses import replace

    chosen = [replace(s, seeds=list(s.seeds[:seeds] if seeds else s.seeds)) for s in suite.scenarios
              if not scenarios or s.name in scenarios]
    return replace(suite, scenarios=chosen)


def model_dir(args, work: Path) -> tuple[Path, str]:
    if args.model:
        return Path(args.model).expanduser(), f"model {args.model}"
    from prunedrive.app.train import untrained_model
    from prunedrive.models.data import synthetic_split
    from prunedrive.models.presets import PRESETS

    path = work / "untrained-small"
    untrained_model(PRESETS["small"], synthetic_split(64, seed=0)).save_pretrained(path)
    return path, ("an UNTRAINED `small` model (random weights: it mostly brakes on unparsable answers, so "
                  "episodes run to their time limit; pass --model for a trained one)")


def make_agent(kind: str, model: Path):
    return LLMAgent(model, name="llm") if kind == "llm" else TextLLMAgent(model, name="llm")


def drive(suite: Suite, kind: str, model: Path, batch: int, workers: int, work: Path, threads: int) -> dict:
    run_dir = RunDir(work / f"k{batch}-w{workers}")
    run_dir.create({"batch": batch, "workers": workers}, [])
    if workers > 1:
        from prunedrive.agents.registry import AgentSpec
        from prunedrive.harness.distributed import RayExecutor

        executor = RayExecutor([AgentSpec(kind, str(model), label="llm")], workers, batch=batch)
        executor.start_all()  # start Ray and every actor before the clock
    else:
        executor = InProcessExecutor([make_agent(kind, model)], batch=batch)
    started = time.perf_counter()
    episodes = run_suite(suite, executor, run_dir, progress=False)
    wall = time.perf_counter() - started
    steps = pd.read_parquet(run_dir.path / "steps.parquet")
    n_steps = len(steps)
    sim, agent = float(steps.sim_wall_s.sum()), float(steps.agent_wall_s.sum())
    return {"batch": batch, "workers": workers, "episodes": len(episodes), "steps": n_steps, "wall_s": wall,
            "episodes_per_hour": 3600 * len(episodes) / wall, "steps_per_s": n_steps / wall,
            # Per env-step: the simulator's and the agent's own time, the rest is the harness's. With workers > 1
            # these are sums over workers, so the split is of worker time, not of this process's wall.
            "sim_ms": 1000 * sim / n_steps, "agent_ms": 1000 * agent / n_steps,
            "harness_ms": 1000 * (wall * workers - sim - agent) / n_steps,
            "mean_batch": float(steps.batch_size.mean()), "threads": threads,
            "executed_flops_per_step": float(steps.executed_flops.mean()),
            "results": episodes.sort_values(["scenario", "seed"])[RESULT_COLUMNS].reset_index(drop=True)}


def token_agreement(kind: str, model: Path, suite: Suite, n: int, batch: int = 8) -> dict:
    """The agent's answers at batch 1 (act) vs in act_batch calls of `batch` rows, on `n` observations the
    expert drives through (every step)."""
    from prunedrive.agents.expert import ExpertAgent
    from prunedrive.harness.env import DriveEnv
    from prunedrive.harness.episode import run_episode
    from prunedrive.models import text

    observations: list[dict] = []
    for scenario in suite.scenarios:
        env = DriveEnv(scenario)
        for seed in scenario.seeds:
            run_episode(env, ExpertAgent(), scenario, seed, on_step=lambda obs, control, info: observations.append(obs))
        env.close()
    rng = np.random.default_rng(0)
    picked = [observations[i] for i in sorted(rng.choice(len(observations), min(n, len(observations)), replace=False))]
    agent = make_agent(kind, model)
    single = []
    for o in picked:
        agent.act(o)
        single.append(agent.last_text)
    if hasattr(agent, "configure_batch"):
        agent.configure_batch(batch)
    batched = []
    for i in range(0, len(picked), batch):
        agent.act_batch(picked[i:i + batch])
        batched += agent.last_texts
    differ = [a != b for a, b in zip(single, batched)]
    controls = [text.parse_action(a) != text.parse_action(b) for a, b in zip(single, batched)]
    return {"observations": len(picked), "batch": batch, "answers_differ": int(sum(differ)),
            "controls_differ": int(sum(controls))}


def matmul_gflops(threads: int, size: int = 512, seconds: float = 1.0) -> float:
    """The machine's float32 matmul speed at this thread count (size x size products), for the agent's ideal time."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        done += 1
    return 2 * size ** 3 * done / (time.perf_counter() - started) / 1e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: an untrained `small` model, built here)")
    p.add_argument("--agent", choices=["llm", "text-llm"], default="llm",
                   help="llm: the vector-encoder model (default); text-llm: a Hugging Face causal LM directory")
    p.add_argument("--suite", default="standard")
    p.add_argument("--seeds", type=int, default=2, help="first N seeds of each scenario (default 2; 0: all)")
    p.add_argument("--scenarios", nargs="+", help="only these scenarios of the suite")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="also with Ray actors, e.g. 1 2")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over all K, alternating order; the median run counts")
    p.add_argument("--tokens", type=int, default=0, help="also compare batch-1 and batch-8 tokens on N observations")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.agent == "text-llm" and not args.model:
        p.error("--agent text-llm needs --model DIR (a Hugging Face causal LM directory)")
    torch.set_num_threads(args.threads)
    suite = subset(load_suite(args.suite), args.seeds or None, args.scenarios)
    batches = sorted(set(args.batches) | {1})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, which = model_dir(args, work)
        n_episodes = sum(len(s.seeds) for s in suite.scenarios)
        print(f"LLM agent: {which}")
        print(f"suite {suite.name}: {n_episodes} episodes, torch threads {args.threads}; timings depend on the "
              "machine's load (ratios to K=1 are measured in this one run)", flush=True)
        runs: dict[tuple, list[dict]] = {}
        for repeat in range(args.repeat):
            for workers in args.workers:
                # Every other round in reverse order, so a drift in the machine's load favours no K.
                for batch in batches if repeat % 2 == 0 else batches[::-1]:
                    row = drive(suite, args.agent, model, batch, workers, work / f"r{repeat}", args.threads)
                    runs.setdefault((workers, batch), []).append(row)
                    print(f"  workers {workers} K={batch:2d}: {row['wall_s']:7.1f} s  {row['episodes_per_hour']:7.0f} "
                          f"ep/h  {row['steps_per_s']:6.1f} steps/s  per step: sim {row['sim_ms']:.2f} ms, agent "
                          f"{row['agent_ms']:.2f} ms, harness {row['harness_ms']:.2f} ms  (mean batch "
                          f"{row['mean_batch']:.1f})", flush=True)
        # The median run of each (workers, K) by wall time (the faster one of two).
        rows = [sorted(runs[(w, b)], key=lambda r: r["wall_s"])[(len(runs[(w, b)]) - 1) // 2]
                for w in args.workers for b in batches]
        reference = next(r for r in rows if r["batch"] == 1 and r["workers"] == args.workers[0])
        print(f"\nratios to K=1, workers {reference['workers']} (same run; median of {args.repeat}):")
        print(" workers  K  episodes/h  steps/s  agent ms/step  sim ms/step  harness ms/step  same results as K=1")
        for r in rows:
            same = r["results"].equals(reference["results"])
            diff = int((r["results"] != reference["results"]).any(axis=1).sum()) if not same else 0
            r["same_results_as_k1"], r["episodes_differing"] = same, diff
            ratio = r["episodes_per_hour"] / reference["episodes_per_hour"]
            print(f" {r['workers']:7d} {r['batch']:2d}  {ratio:9.2f}x "
                  f"{r['steps_per_s'] / reference['steps_per_s']:7.2f}x  {r['agent_ms']:13.2f}  {r['sim_ms']:11.2f}  "
                  f"{r['harness_ms']:15.2f}  "
                  + ("yes" if same else f"no ({diff} of {len(r['results'])} episodes differ)"))
        speed = matmul_gflops(args.threads)
        print(f"\nagent time against its FLOPs at this machine's measured matmul speed ({speed:.1f} GFLOP/s, "
              f"{args.threads} thread(s), 512x512 float32):")
        print(" workers  K  executed GFLOP/step  ideal agent ms/step  measured agent ms/step  measured / ideal")
        for r in rows:
            ideal = 1000 * r["executed_flops_per_step"] / (speed * 1e9)
            r["ideal_agent_ms"], r["matmul_gflops"] = ideal, speed
            print(f" {r['workers']:7d} {r['batch']:2d}  {r['executed_flops_per_step'] / 1e9:19.4f}  {ideal:19.2f}  "
                  f"{r['agent_ms']:22.2f}  {r['agent_ms'] / ideal:15.1f}x")
        tokens = token_agreement(args.agent, model, suite, args.tokens) if args.tokens else None
        if tokens:
            print(f"\nanswers, batch 1 vs batch {tokens['batch']} on {tokens['observations']} expert-driven "
                  f"observations: {tokens['answers_differ']} differ in their text, "
                  f"{tokens['controls_differ']} in the parsed control")
    if any(w > 1 for w in args.workers):
        print("workers > 1: the per-step split sums the workers' time; its harness part includes Ray and idle workers")
    print("timings depend on the machine's load")
    result = {"model": which, "suite": suite.name, "episodes": n_episodes, "tokens": tokens,
              "rows": [{k: v for k, v in r.items() if k != "results"} for r in rows]}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
