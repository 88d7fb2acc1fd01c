"""A prunedrive agent inside the official CARLA Leaderboard 2.0 evaluator (leaderboard_evaluator.py).

    python ${LEADERBOARD_ROOT}/leaderboard/leaderboard_evaluator.py --routes ROUTES.xml --track SENSORS \\
        --agent $(python -m prunedrive.agents.leaderboard_agent) --agent-config prunedrive_agent.yaml \\
        --checkpoint results/simulation_results.json

`--agent-config` is a small YAML file (read with yaml.safe_load):

    agent: llm                  # a registry name (expert, llm, ...) or package.module:factory
    model: /path/to/model       # optional: the model directory (for llm and plug-ins that take one)
    args: {max_new_tokens: 24}  # optional: keyword arguments of the agent's factory
    out: results                # optional: where the per-step Parquet goes (default: beside $CHECKPOINT_ENDPOINT,
                                #   else beside this file); a directory, or a path ending in .parquet
    policy_hz: 5                # optional: agent decisions per simulated second (the control is held between)
    track: SENSORS              # optional: the Leaderboard track the agent declares (SENSORS or MAP)
    device: cuda                # optional: where a model agent runs: cpu (default), cuda, cuda:N (models.device)
    dtype: bfloat16             # optional: its precision: float32 (default), bfloat16, float16 (GPU only)
    latency: fixed:200          # optional: latency in the loop (harness.latency): none (default), fixed:MS,
                                #   profile:FILE (relative to this file), measured

The agent is privileged, as experts like PDM-Lite are: it reads the hero and the actors around it
through scenario_runner's CarlaDataProvider, with the same code (harness.backends.carla_world.WorldReader)
and the same observation (harness.env.DriveEnv) as prunedrive's own CARLA backend, so a model sees
what it saw in `prunedrive run --suite carla-devtest`. It asks the evaluator for one sensor, the
speedometer (the evaluator marks a result without sensors 'Invalid'); its reading is logged. The route
is the evaluator's dense global plan (`set_global_plan`). Each decision's compute (the agent's
`last_compute()`) and text (`last_text`) are written to a Parquet file on `destroy()`, one per route:
prunedrive_steps_<n>.parquet, n the first free number.

Without the `leaderboard` package on the path (tests, a machine without the evaluator) the class
derives from LocalAutonomousAgent, a minimal copy of the interface, so the module still imports.
"""
from __future__ import annotations

import math
import os
import time
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.agents.registry import AgentError, make_agent
from prunedrive.harness.action import BRAKE, Control, checked_control
from prunedrive.harness.agent import compute_report
from prunedrive.harness.backends.base import BackendState
from prunedrive.harness.backends.carla_connection import import_carla
from prunedrive.harness.backends.carla_world import WorldReader, read_statics
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.events import StepEvents
from prunedrive.harness.latency import LatencyClock, LatencyError, LatencyModel, parse_latency
from prunedrive.harness.results import atomic_parquet
from prunedrive.harness.route import RoutePolyline
from prunedrive.harness.rows import STEP_COLUMNS
from prunedrive.models.device import DEFAULT_DEVICE, DEFAULT_DTYPE, check_precision, precision_options
from prunedrive.scenarios.loader import Scenario

CONFIG_KEYS = ("agent", "model", "args", "out", "policy_hz", "track", "device", "dtype", "latency")
SPEEDOMETER = {"type": "sensor.speedometer", "reading_frequency": 20, "id": "speed"}
STEP_FILE = "prunedrive_steps_{:03d}.parquet"


class LocalTrack(Enum):
    """leaderboard.autoagents.autonomous_agent.Track, when the leaderboard package is not importable."""

    SENSORS = "SENSORS"
    MAP = "MAP"
    SENSORS_QUALIFIER = "SENSORS_QUALIFIER"
    MAP_QUALIFIER = "MAP_QUALIFIER"


class LocalAutonomousAgent:
    """The interface of leaderboard's AutonomousAgent (Leaderboard 2.x), used only when the `leaderboard`
    package is not importable. No sensor interface and no `__call__`: the evaluator never runs this one."""

    def __init__(self, carla_host, carla_port, debug=False):
        self.track = LocalTrack.SENSORS
        self._global_plan = None
        self._global_plan_world_coord = None
        self.wallclock_t0 = None

    def setup(self, path_to_conf_file):
        pass

    def sensors(self):
        return []

    def run_step(self, input_data, timestamp):
        raise NotImplementedError

    def destroy(self):
        pass

    @staticmethod
    def get_ros_version():
        return -1

    def set_global_plan(self, global_plan_gps, global_plan_world_coord):
        self._global_plan = list(global_plan_gps)
        self._global_plan_world_coord = list(global_plan_world_coord)


try:
    from leaderboard.autoagents.autonomous_agent import AutonomousAgent, Track
except ImportError:  # no evaluator here (it needs carla and scenario_runner too)
    AutonomousAgent, Track = LocalAutonomousAgent, LocalTrack


def get_entry_point() -> str:
    return "PrunedriveAgent"


def data_provider():
    """scenario_runner's CarlaDataProvider: the evaluator's world and hero."""
    from srunner.scenariomanager.carla_data_provider import CarlaDataProvider  # noqa: PLC0415 -- the evaluator's

    return CarlaDataProvider


class _EvaluatorWorld:
    """The Backend protocol over the world the evaluator drives: it applies the controls and ticks, so
    `reset` and `step` only read the state (WorldReader, as the CARLA backend does)."""

    def __init__(self, reader: WorldReader, polyline: np.ndarray, dt: float):
        self.reader, self.polyline, self.dt = reader, polyline, dt
        self.sim_time_s = 0.0

    def reset(self, seed: int) -> BackendState:
        return self.reader.read(Control(), self.sim_time_s)

    def step(self, control: Control) -> tuple[BackendState, StepEvents]:
        return self.reader.read(control, self.sim_time_s), StepEvents()

    def route_polyline(self) -> np.ndarray:
        return self.polyline.copy()

    def render(self):
        return None

    def close(self) -> None:
        pass


class PrunedriveAgent(AutonomousAgent):
    """A prunedrive agent (registry name or package.module:factory) as a Leaderboard 2.0 agent."""

    def setup(self, path_to_conf_file):
        import yaml

        path = Path(path_to_conf_file)
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise AgentError(f"{path}: cannot read the agent config ({exc})") from None
        if not isinstance(config, dict) or "agent" not in config:
            raise AgentError(f"{path}: expected a mapping with at least 'agent:' (keys: {', '.join(CONFIG_KEYS)})")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise AgentError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
        args = config.get("args") or {}
        if not isinstance(args, dict):
            raise AgentError(f"{path}: 'args' must be a mapping of keyword arguments, got {args!r}")
        model = config.get("model")
        if model is not None:
            model = Path(model).expanduser()
            model = model if model.is_absolute() else path.parent / model
        self.policy_hz = float(config.get("policy_hz", 5.0))
        if not 0.0 < self.policy_hz <= 100.0:
            raise AgentError(f"{path}: policy_hz must be in (0, 100], got {self.policy_hz}")
        track = str(config.get("track", "SENSORS"))
        if track not in Track.__members__:
            raise AgentError(f"{path}: track {track!r}; allowed: {', '.join(Track.__members__)}")
        self.track = Track[track]
        self.latency = self._latency(config.get("latency"), path)
        args = {**args, **self._precision(config, args, path)}
        self.agent = make_agent(str(config["agent"]), model, **args)
        self.out = self._out_path(config.get("out"), path)
        self.carla = import_carla()
        self._env = None
        self._rows: list[dict] = []
        self._calls, self._ticks_per_step, self._done = 0, 1, False
        self._control, self._t0, self._returned = BRAKE, None, None
        self._clock, self._tick_controls = None, [BRAKE]

    @staticmethod
    def _latency(value, config_path: Path) -> LatencyModel | None:
        """The `latency:` entry as harness.latency parses `--latency`; a profile path is relative to the config."""
        text = "none" if value is None else str(value)
        kind, colon, rest = text.partition(":")
        if kind == "profile" and colon and rest and not Path(rest).expanduser().is_absolute():
            text = f"profile:{config_path.parent / rest}"
        try:
            return parse_latency(text)
        except (LatencyError, OSError) as exc:
            raise AgentError(f"{config_path}: latency: {exc}") from None

    @staticmethod
    def _precision(config: dict, args: dict, path: Path) -> dict:
        """The factory keywords of the config's device/dtype (none for cpu/float32), checked now: a CUDA device
        this machine lacks is refused before the first route, naming the file."""
        device, dtype = check_precision(config.get("device", DEFAULT_DEVICE), config.get("dtype", DEFAULT_DTYPE),
                                        (f"{path}: device", f"{path}: dtype"))
        both = [key for key in ("device", "dtype") if key in args and key in config]
        if both:
            raise AgentError(f"{path}: {both[0]} is given twice (top level and under args); give it once")
        return precision_options(device, dtype)

    @staticmethod
    def _out_path(value, config_path: Path) -> Path:
        if value is None:
            endpoint = os.environ.get("CHECKPOINT_ENDPOINT")
            return Path(endpoint).resolve().parent if endpoint else config_path.resolve().parent
        out = Path(value).expanduser()
        return out if out.is_absolute() else config_path.resolve().parent / out

    def sensors(self):
        return [dict(SPEEDOMETER)]

    def set_global_plan(self, global_plan_gps, global_plan_world_coord):
        """Keep the dense route for the observation; the base class keeps its downsampled copy."""
        self._route_xy = np.array([(t.location.x, t.location.y) for t, _ in global_plan_world_coord], float)
        super().set_global_plan(global_plan_gps, global_plan_world_coord)

    # -- the loop ------------------------------------------------------------------------------------
    def _start(self, timestamp: float) -> None:
        provider = data_provider()
        world, hero = provider.get_world(), provider.get_hero_actor()
        if hero is None:
            raise RuntimeError("CarlaDataProvider has no hero vehicle (role_name 'hero')")
        world_map = provider.get_map()
        fixed_delta = world.get_settings().fixed_delta_seconds or 0.05
        self._ticks_per_step = max(1, round(1.0 / (self.policy_hz * fixed_delta)))
        scenario = Scenario(name="leaderboard-route", kind="carla_route", policy_hz=self.policy_hz,
                            duration_s=math.inf, blocked_s=math.inf, deviation_m=math.inf)
        path = RoutePolyline(self._route_xy)
        reader = WorldReader(self.carla, world, world_map, path, read_statics(world, path), hero,
                             scenario.speed_limit_mps)
        # The evaluator ends the route; the env only observes (no timeout, deviation or blocked limits).
        self._backend = _EvaluatorWorld(reader, self._route_xy, self._ticks_per_step * fixed_delta)
        self._env = DriveEnv(scenario, backend=self._backend)
        if self.latency is not None:  # the same clock as prunedrive's own loop, on the evaluator's ticks
            self._clock = LatencyClock(self.latency, self._ticks_per_step * fixed_delta, self._ticks_per_step)
        self._t0 = timestamp
        self.agent.reset(scenario)
        self._town = world_map.name.split("/")[-1]

    def run_step(self, input_data, timestamp):
        started = time.perf_counter()
        if self._env is None:
            self._start(timestamp)
        tick = self._calls % self._ticks_per_step
        self._calls += 1
        if tick == 0 and not self._done:
            self._decide(input_data, timestamp, started)
            self._returned = time.perf_counter()  # the evaluator's and simulator's time starts here
        # Under a latency model the control of each tick comes from the clock (held, or a late answer taking
        # effect mid-step); without one the decision holds for the whole policy step.
        c = self._tick_controls[tick] if self._clock is not None and not self._done else self._control
        return self.carla.VehicleControl(throttle=float(c.throttle), steer=float(c.steer), brake=float(c.brake))

    def _decide(self, input_data, timestamp: float, started: float) -> None:
        self._backend.sim_time_s = float(timestamp - self._t0)
        if not self._rows:
            observation, _ = self._env.reset(seed=0)
        else:
            observation, _, terminated, truncated, _ = self._env.step(self._control)
            if terminated or truncated:  # the route is driven: stand still until the evaluator ends it
                self._done, self._control = True, BRAKE
                return
        if self._clock is not None and not self._clock.free():  # still thinking: the clock drives what holds
            self._hold_step(observation, timestamp)
            return
        wall, cpu = time.perf_counter(), time.process_time()
        answer = self.agent.act(observation)
        agent_wall_s, agent_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        report = compute_report(self.agent)
        control, clamped = checked_control(answer, agent=self.agent.name, step=len(self._rows) + 1)
        timing = self._schedule(control, report, agent_wall_s)
        speed = (input_data or {}).get(SPEEDOMETER["id"])
        self._record(observation, timestamp, timing, agent_wall_s=agent_wall_s, agent_cpu_s=agent_cpu_s,
                     sim_wall_s=started - self._returned if self._returned is not None else np.nan, report=report,
                     clamped=clamped, text=getattr(self.agent, "last_text", None),
                     speedometer_mps=float(speed[1]["speed"]) if speed and speed[1].get("speed") is not None
                     else np.nan)

    def _record(self, observation, timestamp: float, timing: dict, *, agent_wall_s: float = np.nan,
                agent_cpu_s: float = np.nan, sim_wall_s: float = np.nan, report: dict | None = None,
                clamped: bool = False, text: str | None = None, speedometer_mps: float = np.nan) -> None:
        """One step row; a step without a decision (the agent still busy) has no times, compute or text."""
        driven = self._control  # the control in effect at the step's end (under latency: maybe an older one)
        row = {
            "step": len(self._rows) + 1, "sim_time_s": self._backend.sim_time_s, "throttle": driven.throttle,
            "brake": driven.brake, "steer": driven.steer, "speed_mps": float(observation["ego"][0]),
            "route_completion": self._env.criteria.route_completion, "agent_wall_s": agent_wall_s,
            "agent_cpu_s": agent_cpu_s, "sim_wall_s": sim_wall_s,
        }
        row.update({name: float((report or {}).get(name, np.nan)) for name in STEP_COLUMNS if name not in row})
        row.update({"timestamp": float(timestamp), "clamped": bool(clamped), "agent": self.agent.name,
                    "town": self._town, "text": text, "speedometer_mps": speedometer_mps, **timing})
        self._rows.append(row)

    def _schedule(self, control: Control, report: dict, agent_wall_s: float) -> dict:
        """Apply a decision: at once without a latency model, else through the clock (its step row fields)."""
        if self._clock is None:
            self._control = control
            return {}
        decision = self._clock.decide(control, report, agent_wall_s)
        return {"decided": True, "latency_s": decision.latency_s, "effect_tick": decision.effect_tick,
                **self._clock_step()}

    def _clock_step(self) -> dict:
        self._tick_controls, stale = self._clock.tick_controls()
        self._control = self._tick_controls[-1]  # what the env's next step is told was driven
        return {"ticks": len(self._tick_controls), "stale_ticks": stale}

    def _hold_step(self, observation, timestamp: float) -> None:
        """A policy step the agent is busy through: a row without a decision, the held control(s) driven."""
        self._record(observation, timestamp, {"decided": False, "latency_s": np.nan, "effect_tick": -1,
                                              **self._clock_step()})

    def destroy(self):
        """Write this route's steps (if any) and let go of the env."""
        try:
            if getattr(self, "_rows", None):
                path = self.steps_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_parquet(pd.DataFrame(self._rows), path)
                self.written = path
        finally:
            if getattr(self, "_env", None) is not None:
                self._env.close()
            self._env = None

    def steps_path(self) -> Path:
        if self.out.suffix == ".parquet":
            return self.out
        n = 0
        while (self.out / STEP_FILE.format(n)).exists():
            n += 1
        return self.out / STEP_FILE.format(n)


if __name__ == "__main__":  # `--agent $(python -m prunedrive.agents.leaderboard_agent)`: this file's path
    print(Path(__file__).resolve())
