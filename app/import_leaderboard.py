"""Import the official CARLA Leaderboard 2.0 evaluator's results into a prunedrive run directory.

    prunedrive import leaderboard simulation_results.json [more.json ...] --run-id lb-dense [--agent NAME]

Reads what leaderboard/utils/statistics_manager.py writes (`_checkpoint.records[]`, `entry_status`,
the global record's `values`/`labels`), one file per evaluator run or one per route, and Bench2Drive's
merged JSON (tools/merge_route_json.py: the same records without `index`, plus "driving score",
"success rate" and "eval num"; recognised by its shape). Each route record becomes one episode with the
columns `harness.rows.episode_row` writes, so `summary`, `report` and `regress` work on it:

- scenario = the route's name without the repetition ("RouteScenario_3"), seed = the repetition (`_repN`);
- driving_score, route_completion, infraction_penalty = score_composed, score_route, score_penalty, as
  the evaluator computed them (not recomputed: Bench2Drive, for one, drops the min-speed penalty);
- n_<kind> = the number of messages per infraction list, by prunedrive's EventKind names
  (collisions_layout -> collision_static, stop_infraction -> stop_sign, route_dev -> route_deviation,
  vehicle_blocked -> agent_blocked, ...); km_driven = route_length x completion / 100 / 1000;
  outside_lanes_m from the outside-route-lanes message;
- status: Perfect/Completed -> finished; "Failed - Agent deviated from the route" -> route_deviation,
  "... got blocked" -> agent_blocked, "... timed out" -> timeout, "Simulation crashed" -> failed
  (infrastructure), "Agent crashed" / "couldn't be set up" / "sensors were invalid" -> failed (agent),
  Bench2Drive's "TickRuntime" (its tick cap) -> timeout; a plain "Failed" -> collision_ended if it had a
  collision, else timeout. "Started" is a route the evaluator never finished: it has no score, so it gets
  no episode row (no mean counts it); it stays in the manifest's planned episodes and under
  config.unscored, and `import_exit_code` makes the import exit 3 naming it. Any other status is refused;
- sim_time_s, wall_s = duration_game, duration_system; per-step figures are not in the file (NaN);
- everything else a record holds (Bench2Drive's scenario_name, town_name, weather_id, save_name,
  unknown infraction lists, ...) is kept as JSON in `leaderboard_extra`; the original status in
  `leaderboard_status`, the file in `leaderboard_file`.

A file that is not such a JSON is refused (RunError) with the file and the field that is wrong, and so is
one over the limits (MAX_RESULTS_BYTES, MAX_JSON_DEPTH, MAX_ROUTE_ID_CHARS, repetitions in [0, 2**32)) or
inconsistent (score_composed above score_route: the Leaderboard's DS = RC x penalty, penalty <= 1). Everything
is checked before the run directory is made; a failure after that removes what the import made. The episodes
are written in one batch (episodes.parquet, steps.parquet), with progress lines (harness.progress.Ticker) on
stderr when the output goes to a log.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.app.run import EXIT_INFRASTRUCTURE, EXIT_OK
from prunedrive.harness.env import EpisodeOutcome
from prunedrive.harness.events import COLLISIONS, Event, EventKind
from prunedrive.harness.progress import Ticker
from prunedrive.harness.results import RunDir, RunError, check_episode_key, content_hash, episode_key
from prunedrive.harness.rows import STEP_COLUMNS, episode_row
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
    "TickRuntime": ("timeout", ""),  # Bench2Drive's evaluator: the route ran past its tick cap
}
FINISHED = ("Perfect", "Completed")
UNSCORED = "Started"  # RouteRecord's first status: the evaluator never finished (or never scored) the route
STATUSES = (*FINISHED, "Failed", *(f"Failed - {reason}" for reason in FAILURES), UNSCORED)
# Limits on an untrusted file, checked before anything is parsed into rows. A results file holds ~600 bytes
# per route (10,000 routes: 6 MB) and nests 5 levels; parsing 64 MiB of JSON already takes ~1 GB of memory.
MAX_RESULTS_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 32
MAX_ROUTE_ID_CHARS = 128  # a scenario name's limit (scenarios.loader.SAFE_NAME): the route id names files
MAX_REPETITION = 2**32 - 1  # a seed's range (scenarios.loader)
COMPOSED_TOLERANCE = 1e-5  # the evaluator rounds each score to 6 digits
PROGRESS_EVERY_S = 5.0  # a progress line on stderr at most this often (stdout holds the tables)
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


def _load_json(path: Path):
    """The parsed file, within the size and depth limits (size checked before reading a byte)."""
    if not path.is_file():
        raise RunError(f"{path}: no such results file")
    size = path.stat().st_size
    if size > MAX_RESULTS_BYTES:
        raise RunError(f"{path}: {size} bytes; a results file may have at most {MAX_RESULTS_BYTES} "
                       f"({MAX_RESULTS_BYTES // 2**20} MiB); split it (one file per route works)")
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:  # the parser recurses once per level
        raise RunError(f"{path}: nested deeper than the JSON parser allows; a results file nests about 5 levels, "
                       f"at most {MAX_JSON_DEPTH}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, a 5,000-digit number
        raise RunError(f"{path}: not readable JSON ({exc})") from None
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise RunError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels; a results file nests about 5")
    return data


def _deeper_than(data, limit: int) -> bool:
    """True if objects/arrays nest more than `limit` levels (iterative: no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def read_results(path: str | Path) -> tuple[str, dict, list[dict]]:
    """(format, file-level facts, route records) of one results file; raises RunError naming the field."""
    path = Path(path)
    data = _mapping(path, "(top level)", _load_json(path))
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
    if len(route_id) > MAX_ROUTE_ID_CHARS:
        raise _fail(path, f"{where}.route_id", f"{len(route_id)} characters ({route_id[:40]!r}...); a route id "
                                               f"may have at most {MAX_ROUTE_ID_CHARS}")
    _, repetition = split_route_id(route_id)
    if not 0 <= repetition <= MAX_REPETITION:
        raise _fail(path, f"{where}.route_id", f"route {route_id[:40]!r}: repetition {repetition} is outside "
                                               f"[0, {MAX_REPETITION}]")
    status = record.get("status")
    if not isinstance(status, str):
        raise _fail(path, f"{where}.status", f"expected a text, got {status!r}")
    if status not in STATUSES:
        raise _fail(path, f"{where}.status", f"route {route_id}: {status[:80]!r} is not a status the evaluator "
                                             f"writes; allowed: {', '.join(map(repr, STATUSES))}")
    scores = _mapping(path, f"{where}.scores", record.get("scores"))
    route = _number(path, f"{where}.scores.score_route", scores.get("score_route"), 0.0, 100.0)
    _number(path, f"{where}.scores.score_penalty", scores.get("score_penalty"), 0.0, 1.0)
    composed = _number(path, f"{where}.scores.score_composed", scores.get("score_composed"), 0.0, 100.0)
    if composed > route + COMPOSED_TOLERANCE:
        raise _fail(path, f"{where}.scores.score_composed", f"route {route_id}: {composed:g} is above its "
                                                            f"score_route {route:g} (the driving score is route "
                                                            f"completion x a penalty <= 1)")
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


def split_route_id(route_id: str) -> tuple[str, int]:
    """(route name, repetition) of "RouteScenario_3_rep0"; a route id without `_repN` is repetition 0."""
    match = ROUTE_ID.fullmatch(route_id)
    return (match["route"], int(match["rep"])) if match else (route_id, 0)


def _status(text: str, completion: float, events: list[Event]) -> tuple[str, str]:
    """(our status, failure) of a scored Leaderboard route status (one of STATUSES, not UNSCORED)."""
    if text in FINISHED:
        return "finished", ""
    reason = text.partition(" - ")[2]
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


def episode_from_record(record: dict, *, run_id: str, agent: str, source_file: str,
                        steps: pd.DataFrame | dict | None = None) -> tuple[str, dict]:
    """(episode key, episode row) of one scored route record. `steps`: the empty step columns (a frame, or
    {name: empty Series}), made once by a caller that converts many records."""
    route_id = record["route_id"]
    scenario_name, seed = split_route_id(route_id)
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
    row = episode_row(outcome, _empty_steps() if steps is None else steps, run_id=run_id, agent=agent,
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


def _empty_steps(with_ids: bool = False) -> pd.DataFrame:
    """No steps (the results file has none), with the columns a run's steps have (`with_ids`: as in
    steps.parquet, whose rows name their episode)."""
    ids = {"episode": str, "agent": str, "scenario": str, "seed": "int64", "failed": bool} if with_ids else {}
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in
                         [*ids.items(), *((name, float) for name in STEP_COLUMNS)]})


def import_leaderboard(paths: list[str | Path], run_dir: RunDir, agent_name: str = "leaderboard",
                       progress: bool = True) -> pd.DataFrame:
    """Read and check every results file, then write one episode per scored route record into the new run
    `run_dir` in one batch; returns its episodes. Nothing is made before every check passed; a failure while
    writing removes what this import made. Unscored routes (status Started) are planned but get no row."""
    if not paths:
        raise RunError("give at least one results JSON")
    if run_dir.manifest_path.exists():
        raise RunError(f"{run_dir.path} already holds a run; pick another --run-id")
    sources, records = [], []
    for path in map(Path, paths):
        source, facts, file_records = read_results(path)
        sources.append({"file": str(path.resolve()), "format": source, **facts})
        records += [(path, record) for record in file_records]
    ticker = Ticker("import leaderboard", len(records), "routes read", enabled=progress, every_s=PROGRESS_EVERY_S,
                    stream=sys.stderr)
    episodes, unscored = _episodes(records, run_dir.path.name, agent_name, ticker)
    if not episodes:
        raise RunError(f"{', '.join(map(str, paths))}: no scored route: all {len(unscored)} have status "
                       f"{UNSCORED!r} (the evaluator never finished them); run it again with --resume 1")
    config = {"suite": "leaderboard", "imported_from": sources, "agents": [agent_name], "seeds": None,
              "unscored": [{"route_id": r["route_id"], "status": r["status"], "file": str(path)}
                           for _, (path, r) in sorted(unscored.items())]}
    identity = {"suite": "leaderboard", "agents": [agent_name],
                "sources_hash": content_hash([r for _, r in records])}
    rows = pd.DataFrame([row for _, row in sorted(episodes.items())])
    _write_new_run(run_dir, config, sorted([*episodes, *unscored]), identity, rows)
    return run_dir.episodes()


def _episodes(records: list[tuple[Path, dict]], run_id: str, agent: str,
              progress: Ticker) -> tuple[dict[str, dict], dict[str, tuple[Path, dict]]]:
    """({key: row} of the scored routes, {key: (file, record)} of the unscored ones); every key checked
    (fits a file name, unique over all files)."""
    episodes, unscored, seen = {}, {}, {}
    # No steps, once for all routes, as the columns episode_row reads: a DataFrame per route (or even indexing one
    # per route) would be most of the import's time.
    steps = {name: column for name, column in _empty_steps().items()}
    for done, (path, record) in enumerate(records):
        route_id = record["route_id"]
        key = check_episode_key(episode_key(agent, *split_route_id(route_id)),
                                f"{path}: route {route_id} of agent {agent!r}")
        if key in seen:
            raise RunError(f"{path}: route {route_id} is also in {seen[key]}; import each route (and repetition) "
                           "once")
        seen[key] = path
        if record["status"] == UNSCORED:
            unscored[key] = (path, record)
        else:
            episodes[key] = episode_from_record(record, run_id=run_id, agent=agent, source_file=str(path),
                                                steps=steps)[1]
        progress.update(done + 1)
    return episodes, unscored


def _write_new_run(run_dir: RunDir, config: dict, planned: list[str], identity: dict, rows: pd.DataFrame) -> None:
    """Create the run and write its episodes; on any failure (Ctrl-C included) remove what was made here."""
    existed = {p for p in (run_dir.path, run_dir.manifest_path, run_dir.path / ".lock", run_dir.path / "episodes",
                           run_dir.path / "steps") if p.exists()}
    try:
        run_dir.create(config, planned, identity)
        run_dir.lock()
        try:
            run_dir.write_batch(rows, _empty_steps(with_ids=True))
        finally:
            run_dir.unlock()
    except BaseException:
        _remove_made(run_dir, existed)
        raise


def _remove_made(run_dir: RunDir, existed: set[Path]) -> None:
    if run_dir.path not in existed:
        shutil.rmtree(run_dir.path, ignore_errors=True)
        return
    for made in (run_dir.manifest_path, run_dir.path / ".lock", run_dir.path / "episodes.parquet",
                 run_dir.path / "steps.parquet"):
        if made not in existed:
            made.unlink(missing_ok=True)
    for folder in (run_dir.path / "episodes", run_dir.path / "steps"):
        if folder not in existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def import_exit_code(run_dir: RunDir) -> int:
    """0 when every route of the import was scored; 3 (an infrastructure failure: the evaluator stopped before
    it scored them) listing the unscored routes on stderr."""
    unscored = run_dir.manifest()["config"].get("unscored") or []
    if not unscored:
        return EXIT_OK
    print(f"{len(unscored)} route(s) were never finished by the evaluator (status Started): no score, not in "
          "any mean:", file=sys.stderr)
    for route in unscored:
        print(f"  {route['route_id']} ({route['file']})", file=sys.stderr)
    print("run the evaluator again with --resume 1 on the same checkpoint, then import into a new --run-id",
          file=sys.stderr)
    return EXIT_INFRASTRUCTURE
