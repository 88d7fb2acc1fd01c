"""Optional MLflow logging of a finished run (`prunedrive run|bench --mlflow [URI]`).

One MLflow run per agent of a run directory: the manifest's settings as params, every metric of
`harness.metrics` (the summary table's columns, under their names) as metrics, and the run's episodes
file as an artifact. The default
store is an SQLite file beside the run directories, so nothing needs a server. MLflow is imported
only from here, and only when `--mlflow` is given.
"""
from __future__ import annotations

import importlib
import numbers
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from prunedrive.harness.metrics import summary_columns
from prunedrive.harness.results import RunDir, parse_episode_key
from prunedrive.harness.summary import summarize

INSTALL_HINT = '--mlflow needs MLflow: pip install "prunedrive[mlflow]"'
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RUN_ID_TAG = "prunedrive.run_id"
AGENT_TAG = "prunedrive.agent"


def require_mlflow(option: str) -> None:
    """Fail with the install hint (a ValueError: the CLI's exit 2) unless MLflow can write to the store
    `--mlflow` names (empty: the default SQLite store). Called before driving, so that a missing package
    does not cost a whole run."""
    # mlflow-skinny alone lacks what the SQLite store needs; the extra pins both.
    modules = ("mlflow", "sqlalchemy", "alembic") if _is_sqlite(option) else ("mlflow",)
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(INSTALL_HINT) from exc


def tracking_uri(option: str, out_dir: Path) -> str:
    """`--mlflow URI` as given; a bare `--mlflow` (an empty option) is the local store in `out_dir`.
    SQLite, not a `file:` store: MLflow 3.17 refuses the file store unless MLFLOW_ALLOW_FILE_STORE is set."""
    return option or f"sqlite:///{(Path(out_dir) / STORE_FILE).resolve()}"


def log_run(run_dir: RunDir, option: str,
            extra_metrics: Mapping[str, Mapping[str, float]] | None = None) -> list[str]:
    """Log (or update) one MLflow run per agent of `run_dir`; return their MLflow run ids. extra_metrics:
    {agent: {name: value}} logged beside the summary's (the bench's open-loop errors); values that are not
    finite numbers (NaN, the bench's example answers) are left out."""
    uri = tracking_uri(option, run_dir.path.parent)
    require_mlflow(uri)
    # An offline evaluation harness should not phone home; a user who wants MLflow's telemetry sets it.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    manifest, episodes = run_dir.manifest(), run_dir.episodes()
    if episodes.empty:
        print("mlflow: no finished episodes, nothing logged")
        return []
    client = MlflowClient(tracking_uri=uri)
    suite = manifest["config"]["suite"]
    experiment_id = _experiment_id(client, suite, uri)
    artifact = run_dir.path / "episodes.parquet"
    now_ms = int(time.time() * 1000)
    logged = []
    for _, row in summarize(episodes, ["agent"]).iterrows():
        tags = {RUN_ID_TAG: run_dir.path.name, AGENT_TAG: row.agent}
        run_id = _mlflow_run_id(client, experiment_id, tags, f"{run_dir.path.name}/{row.agent}")
        extra = (extra_metrics or {}).get(row.agent, {})
        metrics = {**summary_metrics(row), **{name: float(v) for name, v in extra.items()
                                              if isinstance(v, numbers.Real) and np.isfinite(v)}}
        client.log_batch(run_id,
                         metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in run_params(manifest, row.agent).items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        if artifact.is_file():
            client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id)
        logged.append(run_id)
    print(f"mlflow: {len(logged)} run(s) in experiment {suite!r} at {uri}")
    return logged


def summary_metrics(row: pd.Series) -> dict[str, float]:
    """One agent's row of the summary table: every metric of `harness.metrics` under its summary column
    names. NaN (a metric that does not apply, e.g. comfort with no steps) is left out: MLflow would plot
    it as a value."""
    columns = [column for column in summary_columns() if column in row.index]
    values = pd.to_numeric(row[columns], errors="coerce")
    return {name: float(value) for name, value in values.items() if np.isfinite(value)}


def run_params(manifest: dict, agent: str) -> dict[str, str]:
    """What the manifest knows about how `agent` was run. Only the manifest: it does not change when a
    run is resumed, and MLflow refuses to change a logged param."""
    config = manifest["config"]
    planned = [parse_episode_key(key) for key in manifest.get("planned", [])]
    planned = [(scenario, seed) for name, scenario, seed in planned if name == agent]
    params = {"suite": config["suite"], "agent": agent, "planned_episodes": len(planned),
              "seeds": len({seed for _, seed in planned})}
    # `bench` records model, method and sparsity per agent; `run` has one --model for the whole run.
    model = config.get("models", {}).get(agent) or config.get("model")
    for name, value in (("model", model), ("method", config.get("method", {}).get(agent)),
                        ("sparsity", config.get("sparsity", {}).get(agent))):
        if value is not None:
            params[name] = value
    params.update({f"version.{package}": version for package, version in manifest.get("versions", {}).items()})
    return {name: str(value) for name, value in params.items()}


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


def _artifact_location(uri: str) -> str | None:
    """Artifacts of an SQLite store go beside its file; MLflow's default would be ./mlruns in whatever
    directory the command ran from. Other stores (a server) choose their own."""
    if not _is_sqlite(uri) or uri in ("sqlite://", "sqlite:///:memory:"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS_DIR).as_uri()


def _mlflow_run_id(client, experiment_id: str, tags: dict[str, str], run_name: str) -> str:
    """The MLflow run already logged for these tags (a re-log after a resume updates it), or a new one."""
    query = " and ".join(f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items())
    existing = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if existing:
        return existing[0].info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def _quoted(value: str) -> str:
    # MLflow's filter grammar has no escapes; a run id is a directory name and may hold either quote.
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"--mlflow cannot search for {value!r}: it holds both quote characters")


def _is_sqlite(option: str) -> bool:
    return option == "" or option.startswith("sqlite:")
