"""The harness's own per-step cost as a ratio to the raw highway-env step, measured in one run.

Everything the harness does per step (observation building, route criteria, event scoring input,
per-step records in the runner) is timed against the time spent inside highway-env's own
`env.reset` and `env.step` for the same scenario and seed. The agent replays fixed controls so it costs nothing.

    python benchmarks/harness_overhead.py [--suite smoke] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.episode import run_episode
from prunedrive.scenarios.loader import load_suite


class ReplayAgent:
    name = "replay"

    def __init__(self):
        self.control = Control(throttle=0.4, steer=0.0)

    def reset(self, scenario) -> None:
        pass

    def act(self, observation) -> Control:
        # Light pure-pursuit-free control: steer towards the third route point to stay on the road.
        x, y = observation["route"][min(3, int(observation["route_mask"].sum()) - 1)]
        return Control(throttle=0.4, steer=float(np.clip(2.0 * y / max(x * x + y * y, 1.0) * 5.0, -1, 1)))


def measure(scenario, seed: int) -> tuple[float, float, int]:
    env = DriveEnv(scenario)
    raw_env = env.backend.env
    raw_time = [0.0]
    raw_step = raw_env.step

    def timed_step(action):
        started = time.perf_counter()
        out = raw_step(action)
        raw_time[0] += time.perf_counter() - started
        return out

    raw_reset = raw_env.reset

    def timed_reset(**kwargs):  # highway-env builds its road and traffic here: simulator work too
        started = time.perf_counter()
        out = raw_reset(**kwargs)
        raw_time[0] += time.perf_counter() - started
        return out

    raw_env.step, raw_env.reset = timed_step, timed_reset
    started = time.perf_counter()
    _, steps = run_episode(env, ReplayAgent(), scenario, seed)
    total = time.perf_counter() - started
    env.close()
    harness = total - raw_time[0] - steps["agent_wall_s"].sum()
    return harness, raw_time[0], len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="smoke")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'scenario':<16} {'steps':>6} {'raw ms/step':>12} {'harness ms/step':>16} {'overhead':>9}")
    totals = np.zeros(2)
    for scenario, seed in load_suite(args.suite).episodes():
        runs = [measure(scenario, seed) for _ in range(args.repeats)]
        harness, raw, steps = (float(np.median([r[i] for r in runs])) for i in range(3))
        totals += (harness, raw)
        print(f"{scenario.name:<16} {steps:>6.0f} {1000 * raw / steps:>12.2f} {1000 * harness / steps:>16.3f} "
              f"{100 * harness / raw:>8.2f}%")
    print(f"{'all':<16} {'':>6} {'':>12} {'':>16} {100 * totals[0] / totals[1]:>8.2f}%  (target < 5%)")


if __name__ == "__main__":
    main()
