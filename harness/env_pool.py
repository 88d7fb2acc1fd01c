"""The envs a worker drives: how one is made (`MakeEnv`, the hook that may wrap it in Gymnasium wrappers), and
the pool of free ones per scenario that episodes take and give back."""
from __future__ import annotations

from typing import Callable

import gymnasium as gym

from prunedrive.harness.env import DriveEnv
from prunedrive.scenarios.loader import Scenario

# make_env(scenario, record, **backend_options) -> the env an episode drives: a DriveEnv, or any Gymnasium
# wrapper around one (the runner talks to it through reset/step/info only; harness.env lists the keys).
MakeEnv = Callable[..., gym.Env]


def default_make_env(scenario: Scenario, record: bool, **backend_options) -> DriveEnv:
    return DriveEnv(scenario, render_mode="rgb_array" if record else None, **backend_options)


def close_quietly(env: gym.Env | None) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception:  # noqa: BLE001 -- a dead simulator may fail to close; nothing to keep
        pass


class EnvPool:
    """Free envs per scenario name, made on first use; an episode takes one and gives it back when it ends
    (one after a simulator failure is closed instead). `free` may be the caller's own dict (scenario name ->
    free envs), kept between pools; a name with no free env has no key."""

    def __init__(self, make_env: MakeEnv, record: bool, backend_options: dict | None = None,
                 free: dict[str, list[gym.Env]] | None = None):
        self.make_env, self.record, self.backend_options = make_env, record, backend_options or {}
        self.free = free if free is not None else {}

    def take(self, scenario: Scenario, on_create: Callable[[], None] = lambda: None) -> gym.Env:
        """A free env for `scenario`, or a new one (`on_create` is called first: the episode's phase)."""
        envs = self.free.get(scenario.name)
        if envs:
            env = envs.pop()
            if not envs:
                del self.free[scenario.name]
            return env
        on_create()
        return self.make_env(scenario, self.record, **self.backend_options)

    def give(self, scenario: Scenario, env: gym.Env) -> None:
        self.free.setdefault(scenario.name, []).append(env)

    def close(self) -> None:
        close_envs(self.free)


def close_envs(envs: dict[str, list[gym.Env]], lockstep=None) -> None:
    """Close a worker's free envs (and its lockstep's), whatever state their simulators are in."""
    for free in envs.values():
        for env in free:
            close_quietly(env)
    envs.clear()
    if lockstep is not None:
        lockstep.close()
