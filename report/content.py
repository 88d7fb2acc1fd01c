"""What one report page holds, whatever it is written as (report.render_html, report.render_markdown): the
runs, the comparison table, the per-kind table, the plots, the sections the runs' attachments render, and the
episodes with links to their videos."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from prunedrive.harness.paired import MIN_PAIRS_FOR_VERDICT
from prunedrive.harness.results import RunDir
from prunedrive.report.data import Series
from prunedrive.report.palette import Palette
from prunedrive.report.section import Plot, Section


@dataclass
class Content:
    title: str
    created: str
    series: list[Series]
    columns: list[tuple[str, str]]
    rows: list[dict[str, str]]
    kinds: pd.DataFrame
    plots: list[Plot]
    links: dict[str, dict]
    palette: Palette
    dense: Series | None
    sections: list[Section] = field(default_factory=list)


def videos(series: Series, out_dir: Path) -> dict[tuple[str, int], str]:
    """(scenario, seed) -> link to the episode's video, for the recorded episodes. The videos are copied
    into the report's own videos/ folder, so the links work wherever the report folder is opened."""
    links = {}
    for _, e in series.episodes.iterrows():
        path = RunDir(series.run_path).video_path(e.agent, e.scenario, int(e.seed))
        if path.is_file():
            copy = out_dir / "videos" / series.run_path.name / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            links[(e.scenario, int(e.seed))] = copy.relative_to(out_dir).as_posix()
    return links



def runs_text(series: list[Series]) -> list[tuple[str, str]]:
    out = {}
    for s in series:
        manifest = RunDir(s.run_path).manifest()
        config = manifest.get("config") or {}
        out[s.run] = (f"suite {config.get('suite', '?')}, agents {', '.join(config.get('agents') or [])}, "
                      f"created {manifest.get('created', '?')}, {s.run_path}")
    return list(out.items())


def episode_rows(s: Series, links: dict) -> list[list[str]]:
    rows = []
    for _, e in s.episodes.sort_values(["scenario", "seed"]).iterrows():
        rows.append([e.scenario, e.kind, str(int(e.seed)), e.status, f"{e.driving_score:.1f}",
                     f"{e.route_completion:.1f}", f"{e.infraction_penalty:.3f}", str(int(e.collisions)),
                     links.get((e.scenario, int(e.seed)), "")])
    return rows


EPISODE_HEADER = ["scenario", "kind", "seed", "status", "DS", "RC", "IP", "collisions", "video"]


def comparison_notes(c: Content) -> tuple[str, str]:
    driving = ("n: episodes. DS: driving score = route completion × infraction penalty (CARLA Leaderboard 2.0); "
               "DS and RC: mean ± standard error over episodes.")
    if c.dense is not None:
        driving += (f" ΔDS vs dense: mean over episodes of (agent DS − {c.dense.label} DS) on the same scenario and "
                    f"seed, with its 95% paired-bootstrap CI; verdict: better / worse when the CI excludes 0, "
                    f"\"n too small\" below {MIN_PAIRS_FOR_VERDICT} pairs.")
    else:
        driving += " No dense baseline (an agent whose method is \"dense\"), hence no differences to it."
    present = {column for column, _ in c.columns}
    cost = []
    if "sparsity" in present:
        cost.append("Sparsity: the pruning target.")
    if "effective_gflops" in present or "executed_gflops" in present:
        cost.append("Effective FLOPs count the non-zero weights, executed FLOPs the weights the installed kernels "
                    "multiply (all of them on a dense path); both are deterministic.")
    cost.append("Agent time per step: median over episodes of each episode's p50, p95 the worst episode's p95; wall "
                "time depends on the machine and its load (other processes, thread count), so compare it only "
                "within one run.")
    return driving, " ".join(cost)

