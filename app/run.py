"""The `run` command's module: drive a suite into a run directory, the one function behind `prunedrive run` and
`prunedrive bench` (and `claims`).

It owns what both need to agree on: the run id (safe, inside --out), the planned episode keys, the
manifest (config for people, identity for resume), the resume rule (refused when the suite's content,
the agents or the models' weights differ, naming what differs), one writer per run directory, and the
choice of executor (in-process or Ray).
"""
from __future__ import annotations

import hashlib
import inspect
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import pandas as pd

from prunedrive.agents.registry import AgentSpec, check_agent_name, resolve_factory
from prunedrive.harness.backends import check_suite
from prunedrive.harness.latency import parse_latency
from prunedrive.harness.results import RunDir, RunError, content_hash, episode_key, parse_episode_key
from prunedrive.harness.executors import InProcessExecutor
from prunedrive.harness.limits import EPISODE_TIMEOUT_S, STEP_TIMEOUT_S
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import Suite

# Exit codes of `run` and `bench` (documented in the README).
EXIT_OK, EXIT_BAD_INPUT, EXIT_INFRASTRUCTURE = 0, 2, 3


def weights_hash(model_dir: str | Path) -> str:
    """sha256 of the weight files a loader reads from a model directory (models.hf_causal.weight_files:
    model.safetensors, or the shards its index lists; regular files inside the directory only), streamed:
    what identifies a model. Other *.safetensors files beside them are not read."""
    from prunedrive.models.hf_causal import weight_files

    digest = hashlib.sha256()
    for path in sorted(weight_files(model_dir), key=lambda file: file.name):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def suite_identity(suite: Suite) -> dict:
    """Every field of every scenario (seeds included): two suites with one `name:` but other contents differ."""
    return {"suite": suite.name, "suite_hash": content_hash([asdict(s) for s in suite.scenarios])}


def identity(suite: Suite, specs: list[AgentSpec], names: list[str]) -> dict:
    return {**suite_identity(suite),
            "agents": [{"name": n, "agent": s.name, "args": dict(s.args)} for s, n in zip(specs, names)],
            "models": {n: weights_hash(s.model) for s, n in zip(specs, names) if s.model is not None}}


def takes_precision(spec: AgentSpec) -> bool:
    """Whether the agent's factory names `device` and `dtype` among its parameters (llm, text-llm, plug-ins that
    do): only those get --device/--dtype; the expert and other model-free agents run as they are."""
    try:
        parameters = inspect.signature(resolve_factory(spec.name)).parameters
    except (TypeError, ValueError):
        return False
    return "device" in parameters and "dtype" in parameters


def with_precision(specs: list[AgentSpec], device: str, dtype: str) -> list[AgentSpec]:
    """The specs with the run's device and dtype in the args of every agent that takes them (only where they are
    not cpu/float32: models.device.precision_options). An --agent-arg device/dtype that disagrees is refused."""
    from prunedrive.models.device import precision_options

    out = []
    for spec in specs:
        if not takes_precision(spec):
            out.append(spec)
            continue
        args = dict(spec.args)
        for key, value in (("device", device), ("dtype", dtype)):
            if key in args and args[key] != value:
                raise RunError(f"--agent-arg {key}={args[key]} disagrees with --{key} {value}; give it once, "
                               f"with --{key}")
            args.pop(key, None)
        args.update(precision_options(device, dtype))
        out.append(AgentSpec(spec.name, spec.model, spec.label, tuple(sorted(args.items()))))
    return out


def run_precision(recorded: dict, device: str | None, dtype: str | None, where: Path | None) -> tuple[str, str]:
    """(device, dtype) of a run: what was asked, else (a resume) what the run recorded, else cpu/float32. A
    resume asking for another device or dtype than its run's is refused naming it: the same episodes would be
    computed in other arithmetic. Runs from before these options ran on the CPU in float32."""
    from prunedrive.models.device import DEFAULT_DEVICE, DEFAULT_DTYPE, check_precision

    had = {"device": recorded.get("device", DEFAULT_DEVICE), "dtype": recorded.get("dtype", DEFAULT_DTYPE)}
    asked = {"device": device, "dtype": dtype}
    for key in ("device", "dtype"):
        if where is not None and asked[key] is not None and asked[key] != had[key]:
            raise RunError(f"--{key} {asked[key]}: {where} was driven with {key} {had[key]}; resume it with --{key} "
                           f"{had[key]} (or without --{key}), or start a new run")
    return check_precision(asked["device"] or had["device"], asked["dtype"] or had["dtype"])


def _existing_run(out, run_id, resume, default_run_id) -> RunDir | None:
    """The run directory a drive() call resumes, when it resumes one (before any agent is built)."""
    if resume:
        return find_run(resume, out)
    if default_run_id is not None and not run_id:
        candidate = RunDir.under(out, default_run_id)
        return candidate if candidate.manifest_path.is_file() else None
    return None


def probe_simulators(suite: Suite, backend_options: dict | None, servers: list[str] | None) -> None:
    """Each backend that can (CARLA) is asked once, quickly, whether its server is there: a run against a
    server that is not there fails in seconds (SimulatorError, exit 3), not after every route's retries.
    `servers`: one "host:port" per worker (app.server_options), each probed."""
    from prunedrive.harness.backends import backend_class, suite_backends
    from prunedrive.harness.backends.base import backend_hook
    from prunedrive.harness.distributed import parse_server

    for name, scenario in suite_backends(suite).items():
        probe = backend_hook(backend_class(name), "probe")
        if probe is None:
            continue
        addresses = [dict(zip(("host", "port"), parse_server(s))) for s in servers] if servers else [{}]
        for address in addresses:
            probe(scenario, **{**(backend_options or {}), **address})


def drive(suite: Suite, specs: list[AgentSpec], out: str | Path, *, run_id: str | None = None,
          resume: str | None = None, default_run_id: str | None = None, workers: int | None = None,
          record: bool = False, retries: int = 2, backend_options: dict | None = None,
          servers: list[str] | None = None, ray_address: str | None = None, progress: bool = True,
          retry_failed: bool = False, config: dict | None = None, step_timeout_s: float | None = STEP_TIMEOUT_S,
          episode_timeout_s: float | None = EPISODE_TIMEOUT_S, batch: int = 1, device: str | None = None,
          dtype: str | None = None, latency: str | None = None) -> tuple[RunDir, pd.DataFrame]:
    """Drive every episode of `suite` for every agent into out/<run id>, resuming when asked (or when
    `default_run_id` names an existing run, as the bench does). Returns the run and all its episodes.
    `batch` K > 1 runs K episodes side by side per worker (harness.lockstep.Lockstep). K goes into the manifest's config, not into the resume identity: a run
    may be resumed with another K (an LLM agent's greedy tokens, and so its results, may then differ
    where K's float arithmetic differs from batch 1's; see agents.llm.LLMAgent.act_batch).
    `device`/`dtype` (models.device; None: the resumed run's own, else cpu/float32) go to every agent whose
    factory takes them and into the manifest's config; a resume with another one is refused (`run_precision`).
    `latency` (`--latency`, harness.latency): none (default) or a latency model; it is part of the run's
    identity (a resume or a `regress` across latency settings is refused) and recorded in the manifest.
    `backend_options` go to every env's backend (a server backend's host/port); `servers` ("host:port", one per
    Ray worker) replace host/port per worker (app.server_options builds both from the command line)."""
    check_suite(suite)  # a backend drives every kind and takes every option: a message now, not a failed episode
    if retries < 0:
        raise RunError(f"--retries must be at least 0, got {retries}")
    if batch < 1:
        raise RunError(f"--batch must be at least 1, got {batch}")
    if workers is not None and workers < 1:
        raise RunError(f"--workers must be at least 1, got {workers}")
    for option, seconds in (("--step-timeout", step_timeout_s), ("--episode-timeout", episode_timeout_s)):
        if seconds is not None and not 0 < seconds < float("inf"):  # NaN fails too: it would turn a limit off
            raise RunError(f"{option} must be a finite number of seconds > 0 (None: no limit), got {seconds}")
    existing = _existing_run(out, run_id, resume, default_run_id)
    device, dtype = run_precision(existing.manifest().get("config", {}) if existing else {}, device, dtype,
                                  existing.path if existing else None)
    specs = with_precision(specs, device, dtype)
    latency_model = parse_latency(latency)  # LatencyError (exit 2) names the option or the profile's field
    for spec in specs:
        spec.check()
    probe_simulators(suite, backend_options, servers)
    if workers:
        from prunedrive.harness.distributed import RayExecutor

        executor = RayExecutor(specs, workers, ray_address=ray_address, record=record, retries=retries,
                               backend_options=backend_options, servers=servers,
                               step_timeout_s=step_timeout_s, episode_timeout_s=episode_timeout_s, batch=batch,
                               latency=latency_model)
    else:
        executor = InProcessExecutor([spec() for spec in specs], record=record, retries=retries,
                                     backend_options=backend_options, step_timeout_s=step_timeout_s,
                                     episode_timeout_s=episode_timeout_s, batch=batch, latency=latency_model)
    try:
        names = executor.names()
        for spec, name in zip(specs, names):
            check_agent_name(name, spec.name)
        if len({name.lower() for name in names}) != len(names):  # ignoring case: "A" and "a" are one file on macOS
            raise RunError(f"agents share a name ({', '.join(names)}); give each a --label or another model")
        ident = identity(suite, specs, names)
        if latency_model is not None:  # absent for none: runs from before latency models stay resumable
            ident["latency"] = latency_model.identity
        if resume:
            run_dir = find_run(resume, out)
        else:
            run_dir = RunDir.under(out, run_id or default_run_id or
                                   f"{suite.name}-{'-'.join(names)}-{datetime.now():%Y%m%d-%H%M%S}")
        resuming = resume is not None or (default_run_id is not None and not run_id
                                          and run_dir.manifest_path.is_file())  # the bench's fixed id: finish it
        run_dir.lock()
        try:
            if resuming:
                run_dir.check_identity(ident)
            else:
                planned = [episode_key(n, s.name, seed) for n in names for s, seed in suite.episodes()]
                run_dir.create({"suite": suite.name, "suite_path": str(suite.path), "agents": names,
                                "specs": [asdict(spec) for spec in specs], "record": record, "batch": batch,
                                "device": device, "dtype": dtype, **latency_config(latency_model),
                                **(config or {})},
                               planned, ident)
            episodes = run_suite(suite, executor, run_dir, progress=progress, retry_failed=retry_failed)
        finally:
            run_dir.unlock()
    finally:
        executor.close()
    return run_dir, episodes


def latency_config(model) -> dict:
    """What the manifest's config says about the run's latency model (nothing for none)."""
    if model is None:
        return {}
    return {"latency": model.spec, "latency_label": model.label, "latency_reproducible": model.reproducible}


def find_run(run: str | Path, out: str | Path) -> RunDir:
    """A run given by directory or by id under `out`."""
    path = Path(run)
    if (path / "manifest.json").is_file():
        return RunDir(path)
    if len(path.parts) > 1:  # a path, not an id
        raise RunError(f"{run}: no run directory with a manifest.json there")
    candidate = RunDir.under(out, str(run))
    if not candidate.manifest_path.is_file():
        raise RunError(f"{run}: no run directory with a manifest.json (looked in {path} and {candidate.path})")
    return candidate


def unscored(episodes: pd.DataFrame, run_dir: RunDir) -> list[str]:
    """The keys of the run's planned episodes (its manifest's `planned`) that have no row in `episodes`."""
    have = ({episode_key(row.agent, row.scenario, row.seed) for row in episodes.itertuples()}
            if len(episodes) else set())
    return [key for key in run_dir.manifest().get("planned") or [] if key not in have]


def exit_code(episodes: pd.DataFrame, run_dir: RunDir) -> int:
    """0: every planned episode has a scored row (an agent's own failure is a score); 3: some have none, or
    failed for infrastructure reasons: listed on stderr with the command that runs them again."""
    missing = unscored(episodes, run_dir)
    broken = (episodes[episodes["status"].eq("failed") & episodes["failure"].ne("agent")]
              if len(episodes) and "failure" in episodes else episodes.iloc[0:0])
    if not missing and broken.empty:
        return EXIT_OK
    if missing:
        print(f"{len(missing)} planned episode(s) have no result:", file=sys.stderr)
        for key in missing:
            agent, scenario, seed = parse_episode_key(key)
            print(f"  {agent} {scenario} seed={seed}", file=sys.stderr)
    if not broken.empty:
        print(f"{len(broken)} episode(s) failed for infrastructure reasons (simulator, worker or time limit):",
              file=sys.stderr)
        for row in broken.itertuples():
            first = (row.error.strip().splitlines() or ["unknown error"])[-1]
            print(f"  {row.agent} {row.scenario} seed={row.seed}: {first}", file=sys.stderr)
    print(f"run them again with: prunedrive run --resume {run_dir.path}", file=sys.stderr)
    return EXIT_INFRASTRUCTURE
