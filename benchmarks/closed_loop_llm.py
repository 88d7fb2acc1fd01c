"""Closed-loop check of the driving LLM against the expert on the same episodes.

    python benchmarks/closed_loop_llm.py --suite smoke
    python benchmarks/closed_loop_llm.py --model ~/.cache/prunedrive/models/small-<hash> --suite standard --seeds 2

Prints one row per episode (Leaderboard driving score of both agents, LLM status, parse failures and
ms per LLM step) and the means; --out writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from prunedrive.agents.expert import ExpertAgent
from prunedrive.agents.llm import LLMAgent
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.episode import run_episode
from prunedrive.harness.rows import episode_row
from prunedrive.scenarios.loader import load_suite


def drive(env: DriveEnv, agent, scenario, seed: int) -> dict:
    """One episode through the harness's own loop and scorer (harness.runner)."""
    outcome, steps = run_episode(env, agent, scenario, seed)
    row = episode_row(outcome, steps, run_id="closed-loop-llm", agent=agent.name, scenario=scenario, seed=seed,
                      wall_s=0.0)
    infractions = {k.removeprefix("n_"): int(v) for k, v in row.items() if k.startswith("n_") and v}
    return {"driving_score": row["driving_score"], "route_completion": row["route_completion"],
            "status": row["status"], "penalty": row["infraction_penalty"], "steps": int(row["steps"]),
            "ms_per_step": 1000 * float(steps["agent_wall_s"].mean()), "infractions": infractions}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the zoo's small model, trained if missing)")
    p.add_argument("--suite", default="smoke")
    p.add_argument("--seeds", type=int, default=None, help="first N seeds of each scenario (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from prunedrive.app.train import ensure_default_model
        args.model = ensure_default_model("small")
    llm = LLMAgent(args.model)
    rows = []
    for scenario in load_suite(args.suite).scenarios:
        env = DriveEnv(scenario)
        for seed in scenario.seeds[: args.seeds]:
            failures = llm.parse_failures
            row = {"scenario": scenario.name, "kind": scenario.kind, "seed": seed,
                   "expert": drive(env, ExpertAgent(), scenario, seed), "llm": drive(env, llm, scenario, seed)}
            row["llm"]["parse_failures"] = llm.parse_failures - failures
            rows.append(row)
            e, m = row["expert"], row["llm"]
            print(f"{scenario.name:18s} seed {seed:5d}  expert {e['driving_score']:6.1f} ({e['status']:15s})  "
                  f"llm {m['driving_score']:6.1f} ({m['status']:15s}) parse_fail {m['parse_failures']:3d}  "
                  f"{m['ms_per_step']:5.0f} ms/step  {m['infractions']}", flush=True)
        env.close()
    expert = float(np.mean([r["expert"]["driving_score"] for r in rows]))
    ours = float(np.mean([r["llm"]["driving_score"] for r in rows]))
    print(f"mean driving score: expert {expert:.1f}  llm {ours:.1f}  ratio {ours / max(expert, 1e-9):.2f}")
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append((r["expert"]["driving_score"], r["llm"]["driving_score"]))
    for kind, pairs in by_kind.items():
        print(f"  {kind:15s} expert {np.mean([a for a, _ in pairs]):6.1f}  llm {np.mean([b for _, b in pairs]):6.1f}")
    result = {"model": str(args.model), "suite": args.suite, "rows": rows, "expert_mean": expert, "llm_mean": ours}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
