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
the scenario and the field, and list what is allowed. Suite files are untrusted input: at most
`MAX_SUITE_BYTES`, no YAML aliases (`*name`: an alias bomb expands exponentially), every value's type
checked before use.

This module checks a suite's structure only. Which simulator backend drives a `kind`, and which keys its
`options` may have, each backend declares itself; harness.backends.check_suite checks a suite against them
before it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import re

import yaml

SUITES_DIR = Path(__file__).resolve().parent

MAX_SUITE_BYTES = 1_000_000
MAX_SCENARIOS = 10_000
# Suite and scenario names become parts of file names (run directories, episode keys): no separators.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")


class ScenarioError(ValueError):
    """A suite file that cannot be used; the message names file, scenario and field."""


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    seeds: tuple[int, ...] = (0,)
    duration_s: float = 40.0        # route timeout in simulated seconds (CARLA: the Leaderboard's own rule instead)
    lanes: int = 3
    vehicles: int = 10              # background traffic
    density: float = 1.0            # traffic spacing factor (highway-env vehicles_density)
    pedestrians: int = 0
    speed_limit_mps: float = 25.0
    policy_hz: float = 5.0          # agent decisions per simulated second
    route_length_m: float = 400.0   # highway kinds: length of the route to drive
    blocked_s: float = 180.0        # Leaderboard ActorBlockedTest: stopped this long ends the route
    deviation_m: float = 30.0       # Leaderboard InRouteTest: this far off the route ends it
    options: dict = field(default_factory=dict)  # backend-specific settings; the backend declares their keys


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


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: `&a [...]` / `*a` can expand exponentially (a YAML bomb)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in suite files",
                                              event.start_mark)
        return super().compose_node(parent, index)


def load_suite(name_or_path: str | Path) -> Suite:
    path = suite_path(name_or_path)
    size = path.stat().st_size
    if size > MAX_SUITE_BYTES:
        raise ScenarioError(f"{path}: {size} bytes; a suite file may have at most {MAX_SUITE_BYTES}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # noqa: S506 -- a SafeLoader
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text: {exc}") from None
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
    if len(items) > MAX_SCENARIOS:
        raise ScenarioError(f"{path}: {len(items)} scenarios; at most {MAX_SCENARIOS}")
    scenarios = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ScenarioError(f"{path}: scenarios[{index}] must be a mapping")
        scenarios.append(_scenario({**defaults, **item}, f"{path}: scenarios[{index}]"))
    seen: dict[str, str] = {}
    for s in scenarios:  # case-insensitively: on macOS and Windows "A" and "a" are one file
        if s.name.lower() in seen:
            raise ScenarioError(f"{path}: scenario names must be unique (ignoring case); repeated: "
                                f"{seen[s.name.lower()]!r} and {s.name!r}")
        seen[s.name.lower()] = s.name
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ScenarioError(f"{path}: field 'name' is {name!r}; a suite name is 1-128 letters, digits and _.=+- "
                            "(it names run directories)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(f"{path}: field 'description' must be text")
    return Suite(name=name, path=path, scenarios=tuple(scenarios), description=description)


def load_scenario(reference: str) -> Scenario:
    """"SUITE/SCENARIO" (a suite name or .yaml path, then a scenario name) -> that scenario."""
    suite_ref, sep, name = str(reference).rpartition("/")
    if not sep:
        raise ScenarioError(f"scenario {reference!r}: expected SUITE/SCENARIO, e.g. smoke/roundabout")
    suite = load_suite(suite_ref)
    for scenario in suite.scenarios:
        if scenario.name == name:
            return scenario
    raise ScenarioError(f"{suite.path}: no scenario {name!r}; it has: {', '.join(s.name for s in suite.scenarios)}")


def _scenario(item: dict[str, Any], where: str) -> Scenario:
    if "name" in item:
        where = f"{where} ({item['name']!r})"
    for key in item:
        if key not in SCENARIO_FIELDS:
            raise ScenarioError(f"{where}: unknown field {key!r}; allowed: {', '.join(SCENARIO_FIELDS)}")
    for required in ("name", "kind"):
        if required not in item:
            raise ScenarioError(f"{where}: missing required field {required!r}")
    if not isinstance(item["name"], (str, int)) or isinstance(item["name"], bool) \
            or not SAFE_NAME.fullmatch(str(item["name"])):
        raise ScenarioError(f"{where}: field 'name' is {item['name']!r}; a scenario name is 1-128 letters, digits "
                            "and _.=+- (it names result files)")
    if not isinstance(item["kind"], str) or not item["kind"]:  # which kinds exist: harness.backends.check_suite
        raise ScenarioError(f"{where}: field 'kind' is {item['kind']!r}; a kind is a non-empty name, e.g. "
                            "highway_cruise")
    values: dict[str, Any] = {"name": str(item["name"]), "kind": item["kind"]}
    for key, value in item.items():
        if key in _NUMERIC or key in _INTEGER:
            values[key] = _number(value, key, where)
    seeds = item.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)):
        raise ScenarioError(f"{where}: field 'seeds' must be an integer in [0, 2**32) or a non-empty list of them")
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
