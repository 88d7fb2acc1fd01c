"""Import the official CARLA Leaderboard 2.0 evaluator's results into a prunedrive run directory.

    prunedrive import leaderboard simulation_results.json [more.json ...] --run-id lb-dense [--agent NAME]

Reads what leaderboard/utils/statistics_manager.py writes (`_checkpoint.records[]`, `entry_status`,
the global record's `values`/`labels`), one file per evaluator run or one per route, and Bench2Drive's
merged JSON (tools/merge_route_json.py: the same records without `index`, plus "driving score",
"success rate" and "eval num"; recognised by its shape). Each route record becomes one episode with the
columns `harness.runner.episode_row` writes, so `summary`, `report` and `regress` work on it:

- scenario = the route's name without the repetition ("RouteScenario_3"), seed = the repetition (`_repN`);
- driving_score, route_completion, infraction_penalty = score_composed, score_route, score_penalty, as
  the evaluator computed them (not recomputed: Bench2Drive, for one, drops the min-speed penalty);
- n_<kind> = the number of messages per infraction list, by prunedrive's EventKind names
  (collisions_layout -> collision_static, stop_infraction -> stop_sign, route_dev -> route_deviation,
  vehicle_blocked -> agent_blocked, ...); km_driven = route_length x completion / 100 / 1000;
  outside_lanes_m from the outside-route-lanes message;
- status: Perfect/Completed -> finished; "Failed - Agent deviated from the route" -> route_deviation,
  "... got blocked" -> agent_blocked, "... timed out" -> timeout, "Simulation crashed" -> failed
  (infrastructure), "Agent crashed" / "couldn't be set up" / "sensors were invalid" -> failed (agent);
  a plain "Failed" -> collision_ended if it had a collision, else timeout;
- sim_time_s, wall_s = duration_game, duration_system; per-step figures are not in the file (NaN);
- everything else a record holds (Bench2Drive's scenario_name, town_name, weather_id, save_name,
  unknown infraction lists, ...) is kept as JSON in `leaderboard_extra`; the original status in
  `leaderboard_status`, the file in `leaderboard_file`.

A file that is not such a JSON is refused (RunError) with the file and the field that is wrong.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.env import EpisodeOutcome
from prunedrive.harness.events import COLLISIONS, Event, EventKind
from prunedrive.harness.results import RunDir, RunError, content_hash, episode_key
from prunedrive.harness.runner import STEP_COLUMNS, episode_row
from prunedrive.harness.scoring import episode_status
from prunedrive.scenarios.loader import Scenario

# statistics_manager.py's infraction lists (PENALTY_NAME_DICT values + route_timeout) -> our EventKind.
INFRACTIONS = {
    "collisions_pedestrian": EventKind.COLLISION_PEDESTRIAN,
    "collisions_vehicle": EventKind.COLLISION_VEHICLE,
    "collisions_layout": EventKind.COLLISION_STATIC,
    "red_light": EventKind.RED_LIGHT,
    "stop_infraction": EventKind.STOP_SIGN,
    "scenario_timeouts": EventKind.SCENARIO_TIMEOUT,
    "yield_emergency_vehicle_infractions": EventKind.YIELD_TO_EMERGENCY_VEHICLE,
    "min_speed_infractions": EventKind.MIN_SPEED,
    "outside_route_lanes": EventKind.OUTSIDE_ROUTE_LANES,
    "route_dev": EventKind.ROUTE_DEVIATION,
    "vehicle_blocked": EventKind.AGENT_BLOCKED,
    "route_timeout": EventKind.ROUTE_TIMEOUT,
}
# The text after "Failed - " (statistics_manager.py and FAILURE_MESSAGES) -> (our status, failure).
FAILURES = {
    "Agent deviated from the route": ("route_deviation", ""),
    "Agent got blocked": ("agent_blocked", ""),
    "Agent timed out": ("timeout", ""),
    "Simulation crashed": ("failed", "infrastructure"),
    "Agent crashed": ("failed", "agent"),
    "Agent couldn't be set up": ("failed", "agent"),
    "Agent's sensors were invalid": ("failed", "agent"),
}
RECORD_FIELDS = ("index", "route_id", "status", "num_infractions", "infractions", "scores", "meta")
BENCH2DRIVE_FIELDS = ("driving score", "success rate", "eval num")
ROUTE_ID = re.compile(r"(?P<route>.+)_rep(?P<rep>\d+)")
OUTSIDE_M = re.compile(r"for about (?P<m>[-+0-9.eE]+) meters(?: \((?P<pct>[-+0-9.eE]+)% of)?")
MIN_SPEED_PCT = re.compile(r"Average speed is (?P<pct>[-+0-9.eE]+)%")
KIND = "carla_route"


def _fail(path: Path, field: str, problem: str) -> RunError:
    return RunError(f"{path}: field {field!r}: {problem} (not a CARLA Leaderboard 2.0 results JSON or "
                    f"Bench2Drive merged JSON?)")


def _number(path: Path, field: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, field, f"expected a number, got {value!r}")
    if not low <= value <= high:
        raise _fail(path, field, f"{value} is outside [{low:g}, {high:g}]")
    return float(value)


def _mapping(path: Path, field: str, value) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, field, f"expected an object, got {type(value).__name__}")
    return value


def read_results(path: str | Path) -> tuple[str, dict, list[dict]]:
    """(format, file-level facts, route records) of one results file; raises RunError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: not readable JSON ({exc})") from None
    data = _mapping(path, "(top level)", data)
    checkpoint = _mapping(path, "_checkpoint", data.get("_checkpoint"))
    records = checkpoint.get("records")
    if not isinstance(records, list):
        raise _fail(path, "_checkpoint.records", "missing or not a list")
    if not records:
        raise _fail(path, "_checkpoint.records", "no route records (did the evaluator run any route?)")
    if "entry_status" in data:
        source = "leaderboard"
        facts = {key: data.get(key) for key in ("entry_status", "eligible", "sensors")}
        labels, values = data.get("labels") or [], data.get("values") or []
        if not isinstance(labels, list) or not isinstance(values, list) or len(labels) != len(values):
            raise _fail(path, "values", "'values' and 'labels' must be lists of the same length")
        facts["global"] = dict(zip(map(str, labels), values))
        facts["progress"] = checkpoint.get("progress")
    elif any(key in data for key in BENCH2DRIVE_FIELDS):
        source = "bench2drive"
        facts = {key: data.get(key) for key in BENCH2DRIVE_FIELDS}
    else:
        raise _fail(path, "entry_status", "missing, and no Bench2Drive 'driving score' either")
    return source, facts, [_check_record(path, i, r) for i, r in enumerate(records)]


def _check_record(path: Path, i: int, record) -> dict:
    where = f"_checkpoint.records[{i}]"
    record = _mapping(path, where, record)
    route_id = record.get("route_id")
    if not isinstance(route_id, str) or not route_id:
        raise _fail(path, f"{where}.route_id", f"expected the route's name, got {route_id!r}")
    status = record.get("status")
    if not isinstance(status, str):
        raise _fail(path, f"{where}.status", f"expected a text, got {status!r}")
    scores = _mapping(path, f"{where}.scores", record.get("scores"))
    _number(path, f"{where}.scores.score_route", scores.get("score_route"), 0.0, 100.0)
    _number(path, f"{where}.scores.score_penalty", scores.get("score_penalty"), 0.0, 1.0)
    _number(path, f"{where}.scores.score_composed", scores.get("score_composed"), 0.0, 100.0)
    infractions = _mapping(path, f"{where}.infractions", record.get("infractions", {}))
    for name, messages in infractions.items():
        if not isinstance(messages, list) or not all(isinstance(m, str) for m in messages):
            raise _fail(path, f"{where}.infractions.{name}", "expected a list of messages")
    meta = _mapping(path, f"{where}.meta", record.get("meta"))
    _number(path, f"{where}.meta.route_length", meta.get("route_length"), 0.0)
    for key in ("duration_game", "duration_system"):
        if key in meta:
            _number(path, f"{where}.meta.{key}", meta[key])
    return record


def _status(text: str, completion: float, events: list[Event]) -> tuple[str, str]:
    """(our status, failure) of a Leaderboard route status."""
    if text in ("Perfect", "Completed"):
        return "finished", ""
    if text == "Started":  # the evaluator stopped before it scored the route
        return "failed", "infrastructure"
    reason = text.partition(" - ")[2] if text.startswith("Failed") else text
    if reason in FAILURES:
        return FAILURES[reason]
    return episode_status(completion, events, collision_ended=any(e.kind in COLLISIONS for e in events)), ""


def _events(infractions: dict) -> tuple[list[Event], float]:
    """One event per infraction message (percentages parsed where the message has them), and the metres
    driven outside the route lanes."""
    events, outside_m = [], 0.0
    for name, kind in INFRACTIONS.items():
        for message in infractions.get(name, []):
            value = None
            if kind == EventKind.OUTSIDE_ROUTE_LANES:
                found = OUTSIDE_M.search(message)
                outside_m += float(found["m"]) if found else 0.0
                value = float(found["pct"]) if found and found["pct"] else 0.0
            elif kind == EventKind.MIN_SPEED:
                found = MIN_SPEED_PCT.search(message)
                value = float(found["pct"]) if found else 100.0
            events.append(Event(kind, 0, value=value, detail=message))
    return events, outside_m


def episode_from_record(record: dict, *, run_id: str, agent: str, source_file: str) -> tuple[str, dict]:
    """(episode key, episode row) of one route record."""
    route_id = record["route_id"]
    match = ROUTE_ID.fullmatch(route_id)
    scenario_name, seed = (match["route"], int(match["rep"])) if match else (route_id, 0)
    scores, meta, infractions = record["scores"], record["meta"], record.get("infractions", {})
    completion = float(scores["score_route"])
    events, outside_m = _events(infractions)
    status, failure = _status(record["status"], completion, events)
    outcome = EpisodeOutcome(route_completion=completion, route_length_m=float(meta["route_length"]),
                             events=events, collision_ended=status == "collision_ended",
                             sim_time_s=float(meta.get("duration_game", np.nan)), efficiency=np.nan,
                             comfort=np.nan, steps=0, outside_lanes_m=outside_m)
    scenario = Scenario(name=scenario_name, kind=KIND)
    error = record["status"] if status == "failed" else None
    row = episode_row(outcome, pd.DataFrame({name: [] for name in STEP_COLUMNS}), run_id=run_id, agent=agent,
                      scenario=scenario, seed=seed, wall_s=float(meta.get("duration_system", np.nan)),
                      error=error, phase="leaderboard" if error else "", failure=failure)
    # The evaluator's own scores and status, not ours recomputed from the messages.
    row.update(status=status, driving_score=float(scores["score_composed"]), route_completion=completion,
               infraction_penalty=float(scores["score_penalty"]))
    row["success"] = status == "finished" and all(
        row[f"n_{kind.value}"] == 0 for kind in EventKind if kind != EventKind.MIN_SPEED)
    extra = {k: v for k, v in record.items() if k not in RECORD_FIELDS}
    unknown = {k: v for k, v in infractions.items() if k not in INFRACTIONS}
    if unknown:
        extra["infractions"] = unknown
    extra.update({f"meta.{k}": v for k, v in meta.items() if k not in ("route_length", "duration_game",
                                                                      "duration_system")})
    row.update(leaderboard_route_id=route_id, leaderboard_status=record["status"],
               leaderboard_index=int(record["index"]) if isinstance(record.get("index"), int) else -1,
               leaderboard_file=source_file, leaderboard_extra=json.dumps(extra, sort_keys=True, default=str))
    return episode_key(agent, scenario_name, seed), row


def import_leaderboard(paths: list[str | Path], run_dir: RunDir, agent_name: str = "leaderboard") -> pd.DataFrame:
    """Read every results file (all are checked before anything is written), then write one episode per
    route record into the new run `run_dir`; returns its episodes."""
    if not paths:
        raise RunError("give at least one results JSON")
    sources, episodes = [], {}
    for path in map(Path, paths):
        source, facts, records = read_results(path)
        sources.append({"file": str(path.resolve()), "format": source, **facts})
        for record in records:
            key, row = episode_from_record(record, run_id=run_dir.path.name, agent=agent_name,
                                           source_file=str(path))
            if key in episodes:
                raise RunError(f"{path}: route {record['route_id']} is also in {episodes[key][1]['leaderboard_file']}; "
                               "import each route (and repetition) once")
            episodes[key] = (record, row)
    config = {"suite": "leaderboard", "imported_from": sources, "agents": [agent_name], "seeds": None}
    identity = {"suite": "leaderboard", "agents": [agent_name],
                "sources_hash": content_hash([r for r, _ in episodes.values()])}
    run_dir.create(config, sorted(episodes), identity)
    run_dir.lock()
    try:
        empty = pd.DataFrame({name: pd.Series(dtype=float) for name in STEP_COLUMNS})
        for key, (_, row) in episodes.items():
            run_dir.write_episode(key, row, empty)
        run_dir.consolidate()
    finally:
        run_dir.unlock()
    return run_dir.episodes()
