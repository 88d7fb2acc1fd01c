"""Load and validate scenario suites.

A suite file is YAML (read with ``yaml.safe_load``)::

    name: smoke
    description: a few short episodes
    defaults: {duration_s: 30}        # optional, merged into every scenario
    scenarios:
      - name: cruise
        kind: highway_cruise
        seeds: [101, 102]
        lanes: 3

Every scenario x seed is one episode. Unknown or mistyped fields are errors that name the file,
the scenario and the field, and list what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

SUITES_DIR = Path(__file__).resolve().parent

# Which backend drives each scenario kind.
KIND_BACKEND = {
    "highway_cruise": "highway",
    "dense_highway": "highway",
    "onramp_merge": "highway",
    "roundabout": "highway",
    "intersection": "highway",
    "carla_route": "carla",
}


class ScenarioError(ValueError):
    """A suite file that cannot be used; the message names file, scenario and field."""


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    seeds: tuple[int, ...] = (0,)
    duration_s: float = 40.0        # route timeout in simulated seconds
    lanes: int = 3
    vehicles: int = 10              # background traffic
    density: float = 1.0            # traffic spacing factor (highway-env vehicles_density)
    pedestrians: int = 0
    speed_limit_mps: float = 25.0
    policy_hz: float = 5.0          # agent decisions per simulated second
    route_length_m: float = 400.0   # highway kinds: length of the route to drive
    blocked_s: float = 180.0        # Leaderboard ActorBlockedTest: stopped this long ends the route
    deviation_m: float = 30.0       # Leaderboard InRouteTest: this far off the route ends it
    options: dict = field(default_factory=dict)  # backend-specific settings, validated by it

    @property
    def backend(self) -> str:
        return KIND_BACKEND[self.kind]

    def with_seed_id(self, seed: int) -> str:
        return f"{self.name}/seed={seed}"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    scenarios: tuple[Scenario, ...]
    description: str = ""

    def episodes(self) -> list[tuple[Scenario, int]]:
        return [(s, seed) for s in self.scenarios for seed in s.seeds]


_NUMERIC = {"duration_s", "density", "speed_limit_mps", "policy_hz", "route_length_m", "blocked_s", "deviation_m"}
_INTEGER = {"lanes", "vehicles", "pedestrians"}
_LIMITS = {
    "duration_s": (1.0, 3600.0), "lanes": (1, 8), "vehicles": (0, 200), "density": (0.1, 10.0),
    "pedestrians": (0, 50), "speed_limit_mps": (1.0, 60.0), "policy_hz": (0.5, 50.0), "route_length_m": (20.0, 20000.0),
    "blocked_s": (1.0, 3600.0), "deviation_m": (1.0, 1000.0),
}
SCENARIO_FIELDS = tuple(f.name for f in fields(Scenario))


def suite_path(name_or_path: str | Path) -> Path:
    """A suite given by name (a YAML file in scenarios/) or by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ScenarioError(f"{path}: no such suite file")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise ScenarioError(f"unknown suite {str(name_or_path)!r}; known suites: {', '.join(known)} "
                            "(or give a path to a .yaml file)")
    return candidate


def load_suite(name_or_path: str | Path) -> Suite:
    path = suite_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping with 'name' and 'scenarios' at the top")
    allowed_top = {"name", "description", "defaults", "scenarios"}
    for key in raw:
        if key not in allowed_top:
            raise ScenarioError(f"{path}: unknown top-level field {key!r}; allowed: {', '.join(sorted(allowed_top))}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ScenarioError(f"{path}: field 'defaults' must be a mapping")
    items = raw.get("scenarios")
    if not isinstance(items, list) or not items:
        raise ScenarioError(f"{path}: field 'scenarios' must be a non-empty list")
    scenarios = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ScenarioError(f"{path}: scenarios[{index}] must be a mapping")
        scenarios.append(_scenario({**defaults, **item}, f"{path}: scenarios[{index}]"))
    names = [s.name for s in scenarios]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ScenarioError(f"{path}: scenario names must be unique; repeated: {', '.join(duplicated)}")
    return Suite(name=str(raw.get("name", path.stem)), path=path, scenarios=tuple(scenarios),
                 description=str(raw.get("description", "")))


def _scenario(item: dict[str, Any], where: str) -> Scenario:
    if "name" in item:
        where = f"{where} ({item['name']!r})"
    for key in item:
        if key not in SCENARIO_FIELDS:
            raise ScenarioError(f"{where}: unknown field {key!r}; allowed: {', '.join(SCENARIO_FIELDS)}")
    for required in ("name", "kind"):
        if required not in item:
            raise ScenarioError(f"{where}: missing required field {required!r}")
    if item["kind"] not in KIND_BACKEND:
        raise ScenarioError(f"{where}: field 'kind' is {item['kind']!r}; allowed: {', '.join(KIND_BACKEND)}")
    values: dict[str, Any] = {"name": str(item["name"]), "kind": item["kind"]}
    for key, value in item.items():
        if key in _NUMERIC or key in _INTEGER:
            values[key] = _number(value, key, where)
    seeds = item.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ScenarioError(f"{where}: field 'seeds' must be a non-negative integer or a non-empty list of them")
    if len(set(seeds)) != len(seeds):
        raise ScenarioError(f"{where}: field 'seeds' repeats a seed")
    values["seeds"] = tuple(seeds)
    options = item.get("options", {})
    if not isinstance(options, dict):
        raise ScenarioError(f"{where}: field 'options' must be a mapping")
    values["options"] = options
    return Scenario(**values)


def _number(value: Any, key: str, where: str) -> float | int:
    lo, hi = _LIMITS[key]
    integer = key in _INTEGER
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ScenarioError(f"{where}: field {key!r} must be {kind} in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"{where}: field {key!r} is {value}; allowed range [{lo}, {hi}]")
    return int(value) if integer else float(value)
