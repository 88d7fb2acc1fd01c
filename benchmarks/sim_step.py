"""Per-kind simulator step time of the embedded backend: highway-env's original code against ours, in one run.

For each highway-env scenario kind of a suite, the expert drives a few of its episodes twice: on the
original env (`highway.original_env`: highway-env's own road and network classes, building its pandas
observation every step, which we skip since the backend reads the road itself; at the intersection its own
`RegulatedRoad`, whose conflict test deep-copies vehicles) and on ours (no observation; `FastRoad`,
`FastRoadNetwork`, `FastRegulatedRoad`). The time is highway-env's `env.step` (its simulation
frames and its observation), divided by its frames per policy step: ms per simulator step. Original and
fast episodes alternate, so a change in machine load hits both; timings still depend on that load (other
processes, CPU frequency): compare the ratios, and rerun on a quiet machine for absolute numbers.
Each pair of episodes must also end with the same outcome, or the script stops.

    python benchmarks/sim_step.py [--suite standard] [--episodes 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.backends import highway
from prunedrive.harness.env import DriveEnv
from prunedrive.scenarios.loader import load_suite


def episode(scenario, seed: int, env_cls) -> tuple[float, int, object]:
    """One expert episode on `env_cls`: seconds inside highway-env's env.step, simulator steps, outcome."""
    original_cls = highway._ENVS[scenario.kind]
    highway._ENVS[scenario.kind] = env_cls
    try:
        env = DriveEnv(scenario)
    finally:
        highway._ENVS[scenario.kind] = original_cls
    raw = env.backend.env
    frames = int(raw.unwrapped.config["simulation_frequency"] // raw.unwrapped.config["policy_frequency"])
    spent, raw_step = [0.0], raw.step

    def timed_step(action):
        started = time.perf_counter()
        out = raw_step(action)
        spent[0] += time.perf_counter() - started
        return out

    raw.step = timed_step
    obs, _ = env.reset(seed=seed)
    agent, policy_steps, info = ExpertAgent(), 0, {}
    while True:
        obs, _, terminated, truncated, info = env.step(agent.act(obs))
        policy_steps += 1
        if terminated or truncated:
            break
    env.close()
    return spent[0], policy_steps * frames, info["outcome"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="standard")
    parser.add_argument("--episodes", type=int, default=3, help="seeds per scenario (the suite's first ones)")
    args = parser.parse_args()
    print("timings depend on machine load; original and fast episodes alternate, so compare the ratios")
    print(f"{'scenario':<16} {'kind':<15} {'sim steps':>9} {'original ms':>12} {'fast ms':>9} {'ratio':>7}")
    for scenario in load_suite(args.suite).scenarios:
        fast_cls = highway._ENVS.get(scenario.kind)
        if fast_cls is None or scenario.kind not in highway.HighwayBackend.KINDS:
            continue
        original_cls = highway.original_env(scenario.kind)
        totals = np.zeros(2)
        steps = 0
        for seed in scenario.seeds[: args.episodes]:
            original_s, original_steps, original_outcome = episode(scenario, seed, original_cls)
            fast_s, fast_steps, fast_outcome = episode(scenario, seed, fast_cls)
            if fast_outcome != original_outcome or fast_steps != original_steps:
                raise SystemExit(f"{scenario.name} seed {seed}: the fast episode differs from the original")
            totals += (original_s, fast_s)
            steps += fast_steps
        original_ms, fast_ms = 1000 * totals / steps
        print(f"{scenario.name:<16} {scenario.kind:<15} {steps:>9} {original_ms:>12.2f} {fast_ms:>9.2f} "
              f"{original_ms / fast_ms:>6.2f}x")


if __name__ == "__main__":
    main()
