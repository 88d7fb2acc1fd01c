"""`prunedrive same-episodes A B`: did two runs drive the same episodes? Determinism across versions, layouts or
machines, checked the way a restructure or a new checkpoint format must be: every episode (agent, scenario, seed)
and every step row of one run against the other's, column by column, except what the machine decides (wall and
CPU times, memory peaks, tracebacks) and what names the run (its id, the episode key).

    prunedrive same-episodes results/bench-before results/bench-after
    prunedrive same-episodes RUN_A RUN_B --agent-a llm-owl70 --agent-b llm-owl70-dense   # one agent each, renamed

Exit codes: 0 identical, 1 a difference (the columns and the first differing episodes are listed), 2 bad input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.results import RunDir, RunError

# What differs between two honest runs of the same episodes: the machine's timings and memory, the text of a
# traceback (file and line numbers move with the code), and the names that carry the run's id.
MACHINE_COLUMNS = ("wall_s", "agent_wall_s", "agent_cpu_s", "sim_wall_s", "device_time_s", "peak_mem_bytes",
                   "device_peak_mem_bytes", "error")
NAME_COLUMNS = ("run_id", "episode")


def _compared(column: str) -> bool:
    return column not in NAME_COLUMNS and not any(column == c or column.startswith(f"{c}_") for c in MACHINE_COLUMNS)


@dataclass
class TableComparison:
    table: str
    rows: tuple[int, int]
    columns: list[str]
    differing: list[str] = field(default_factory=list)
    only_in: dict[str, list[str]] = field(default_factory=dict)
    first_keys: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.rows[0] == self.rows[1] and not self.differing and not any(self.only_in.values())

    def text(self) -> str:
        head = (f"{self.table}: {self.rows[0]} vs {self.rows[1]} rows, {len(self.columns)} columns compared: "
                + ("identical" if self.identical else "DIFFERENT"))
        lines = [head]
        if self.differing:
            lines.append(f"  differing columns: {', '.join(self.differing)}")
        for side, columns in self.only_in.items():
            if columns:
                lines.append(f"  only in {side}: {', '.join(columns)}")
        if self.first_keys:
            lines.append(f"  first differing rows: {'; '.join(self.first_keys)}")
        return "\n".join(lines)


def _frame(run: RunDir, table: str, agent: str | None) -> pd.DataFrame:
    path = run.path / f"{table}.parquet"
    if not path.is_file():
        raise RunError(f"{run.path}: no {table}.parquet (a finished or consolidated run has one)")
    frame = pd.read_parquet(path)
    if agent is not None:
        if agent not in set(frame["agent"]):
            raise RunError(f"{path}: no agent {agent!r}; it has: {', '.join(sorted(set(frame['agent'])))}")
        frame = frame[frame["agent"] == agent].assign(agent="(compared)")
    return frame


def _equal(a: pd.Series, b: pd.Series) -> np.ndarray:
    if a.dtype.kind in "fcib" and b.dtype.kind in "fcib":
        x, y = a.to_numpy(float), b.to_numpy(float)
        return (x == y) | (np.isnan(x) & np.isnan(y))
    return (a.astype(str).to_numpy() == b.astype(str).to_numpy())


def compare_table(a: RunDir, b: RunDir, table: str, agent_a: str | None = None,
                  agent_b: str | None = None) -> TableComparison:
    """One table (episodes or steps) of two runs, rows matched by agent, scenario, seed (and step)."""
    key = ["agent", "scenario", "seed"] + (["step"] if table == "steps" else [])
    left, right = (_frame(a, table, agent_a).sort_values(key).reset_index(drop=True),
                   _frame(b, table, agent_b).sort_values(key).reset_index(drop=True))
    shared = [c for c in left.columns if c in right.columns and _compared(c)]
    result = TableComparison(table, (len(left), len(right)), shared,
                             only_in={"A": sorted(set(left.columns) - set(right.columns)),
                                      "B": sorted(set(right.columns) - set(left.columns))})
    if len(left) != len(right) or not left[key].astype(str).equals(right[key].astype(str)):
        result.differing = ["(the episodes themselves: rows or keys differ)"]
        return result
    same = np.ones(len(left), bool)
    for column in shared:
        equal = _equal(left[column], right[column])
        if not equal.all():
            result.differing.append(column)
            same &= equal
    result.first_keys = [" ".join(str(v) for v in row) for row in left.loc[~same, key].head(3).itertuples(index=False)]
    return result


def same_episodes(a: str | Path, b: str | Path, agent_a: str | None = None, agent_b: str | None = None) -> int:
    """Print the comparison of both tables; 0 when identical, 1 otherwise."""
    if (agent_a is None) != (agent_b is None):
        raise ValueError("--agent-a and --agent-b go together (the agent compared in each run)")
    runs = RunDir(Path(a)), RunDir(Path(b))
    results = [compare_table(*runs, table, agent_a, agent_b) for table in ("episodes", "steps")]
    print(f"A: {runs[0].path}\nB: {runs[1].path}")
    for result in results:
        print(result.text())
    print("ignored (the machine's or the run's name): " + ", ".join((*MACHINE_COLUMNS, *NAME_COLUMNS))
          + "; and columns starting with those names")
    return 0 if all(r.identical for r in results) else 1
