"""The report sections of `prunedrive bench` (report.section's contract), named by what bench attaches to its run:
- `open_loop` ({agent: {metric: value}}, app.eval_open.evaluate_open_loop's keys): `open_loop_section`, a table
  with units;
- `checkpoints` ({agent: models.checkpoints.checkpoint_record with ratio_to_dense}): `checkpoints_section`, the
  cost table's cells of each checkpoint (bytes on disk, against the dense model's, scheme and execution)."""
from __future__ import annotations

import numpy as np

from prunedrive.report.data import ReportContext
from prunedrive.report.section import Section, Table, section_renderer
from prunedrive.report.tables import checkpoint_cells

OPEN_LOOP_TITLE = "Open-loop errors"
# Open-loop metrics (app.eval_open.evaluate_open_loop): (key, header, unit, scale, decimals).
OPEN_LOOP = [
    ("lon_control_error", "lon. control MAE", "0–1", 1, 3),
    ("lat_control_error", "lat. control MAE", "steer, −1–1", 1, 3),
    ("action_parse_rate", "actions parsed", "%", 100, 0),
    ("vehicle_count_error", "vehicle count MAE", "vehicles", 1, 2),
    ("pedestrian_count_error", "pedestrian count MAE", "pedestrians", 1, 2),
    ("lead_presence_accuracy", "lead presence", "% correct", 100, 0),
    ("lead_distance_error", "lead distance MAE", "m", 1, 1),
    ("traffic_light_accuracy", "light state", "% correct", 100, 0),
    ("traffic_light_distance_error", "light distance MAE", "m", 1, 1),
    ("perception_parse_rate", "perception parsed", "%", 100, 0),
    ("n", "samples", "", 1, 0),
]
OPEN_LOOP_NOTE = (
    "Open-loop: each model's answers on the held-out split of the expert's driving dataset (no simulator). "
    "lon. control MAE: mean absolute error of the longitudinal control (throttle − brake + 1) / 2, in [0, 1]; "
    "lat. control MAE: of the steer, in [−1, 1] (an unparsable answer counts as a prediction of 0). Count errors: "
    "mean absolute error in vehicles or pedestrians; distance errors in metres; presence, light state and parse "
    "rates: % of the samples. Lower errors and higher rates are better.")


@section_renderer
def open_loop_section(errors: dict, context: ReportContext) -> Section | None:
    """The open-loop table of the run's agents that have errors ({agent: {metric: value}}), with units; None when
    no agent of the run has any."""
    rows = []
    for s in context.run_series():
        values = errors.get(s.agent) if isinstance(errors, dict) else None
        if not isinstance(values, dict):
            continue
        row = {"agent": s.label}
        for key, _, _, scale, decimals in OPEN_LOOP:
            value = values.get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                row[key] = f"{scale * value:.{decimals}f}"
        rows.append(row)
    if not rows:
        return None
    columns = [("agent", "agent")] + [(key, f"{header} ({unit})" if unit else header)
                                      for key, header, unit, _, _ in OPEN_LOOP if any(key in r for r in rows)]
    return Section(OPEN_LOOP_TITLE, [Table(columns, rows, OPEN_LOOP_NOTE, id=f"open-loop-{context.run}")])


@section_renderer
def checkpoints_section(records: dict, context: ReportContext) -> Section:
    """No section of its own: the comparison's cost cells of each model of the run, from the bench's records (they
    know the ratio to the dense model's bytes, which a model card alone does not)."""
    return Section("", agent_cells={s.label: checkpoint_cells(records[s.agent]) for s in context.run_series()
                                    if isinstance(records, dict) and isinstance(records.get(s.agent), dict)})
