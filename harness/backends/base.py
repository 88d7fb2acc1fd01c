"""The interface between the simulator-neutral env and a simulator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.harness.events import StepEvents
from prunedrive.harness.observation import EgoState, WorldObjects


@dataclass
class BackendState:
    """What a backend reads off its simulator after a reset or a step (world frame)."""

    ego: EgoState
    objects: WorldObjects
    outside_route_lanes: bool = False  # ego off the road or in a lane of the opposite direction
    sim_time_s: float = 0.0


@dataclass(frozen=True)
class ServerOptions:
    """How the command line reaches a backend that drives a simulator server: `--{flag}-host` and `--{flag}-port`
    (the server of every env: constructor keywords `host` and `port`) and `--{flag}-servers HOST:PORT ...` (one
    server per Ray worker, worker i always on server i). Declaring this is all a server-based backend does for
    its flags; app.server_options adds and checks them, the executors thread them as one mapping."""

    flag: str   # "carla": --carla-host, --carla-port, --carla-servers
    label: str  # "CARLA": how help texts and messages name the simulator


class Backend(Protocol):
    """A simulator behind the env. Backends report state and events; they never score.

    A backend class is constructed as `Backend(scenario, render=False, **connection)` and declares what it
    drives, so that adding one touches its own module and one registration (harness.backends.BACKENDS):
      KINDS    the scenario kinds it drives (a suite's `kind:`); a built-in backend's kind wins over a plug-in's
      OPTIONS  the keys a scenario's `options:` may have for it (a suite is checked against them before any
               episode; an unknown key is refused, naming the allowed ones)
      SERVER   a ServerOptions when it drives a simulator server (its host/port flags), else None
    """

    KINDS: ClassVar[tuple[str, ...]]
    OPTIONS: ClassVar[tuple[str, ...]]
    SERVER: ClassVar[ServerOptions | None]
    dt: float  # simulated seconds per env step

    def reset(self, seed: int) -> BackendState: ...

    def route_polyline(self) -> np.ndarray:
        """World-frame (n, 2) points of the route set up by the last reset, start to goal."""
        ...

    def step(self, control: Control) -> tuple[BackendState, StepEvents]: ...

    def render(self) -> np.ndarray | None:
        """An RGB frame (H, W, 3) uint8 of the current state, or None when not available."""
        ...

    def close(self) -> None: ...


class BackendHooks(Protocol):
    """What a backend may add besides `Backend`: any of these, or none. The harness reads them through
    `backend_hook`, so every optional capability is declared here, not only in a docstring."""

    ticks_per_step: int      # with step_ticks: simulator ticks per env step
    route_timeout_s: float   # the backend ends the route on its own (growing) timeout, the Leaderboard's: the env
                             # then sets no duration limit of its own

    def step_ticks(self, controls: list[Control]) -> tuple[BackendState, StepEvents]:
        """One env step with one control per simulator tick (latency models: harness.latency)."""

    @classmethod
    def probe(cls, scenario, **connection) -> None:
        """Before any episode: is the simulator server there? (raise SimulatorError, naming it, when not)."""


BACKEND_HOOKS = frozenset({*BackendHooks.__annotations__,
                           *(name for name in vars(BackendHooks) if not name.startswith("_"))})


def backend_hook(backend, name: str):
    """The backend's (or backend class's) optional hook `name`, declared in BackendHooks; None when it has none."""
    if name not in BACKEND_HOOKS:
        raise ValueError(f"{name!r} is not a declared backend hook; declared: {', '.join(sorted(BACKEND_HOOKS))}")
    return getattr(backend, name, None)


class SimulatorError(RuntimeError):
    """The simulator failed (crashed, timed out): the episode is `failed: simulator`."""
