"""The report section of `prunedrive claims`: claims attaches its table (`claims`) with `section` naming
`claims_section`, and claim (c)'s sensitivity table (`sensitivity`, data only); `prunedrive report` calls
`claims_section` (report.section's contract), which draws both tables, a forest plot of the paired differences
coloured by verdict and the DS drop against the share of the model's weights removed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from prunedrive.harness.results import RunDir
from prunedrive.report.data import ReportContext
from prunedrive.report.plots import new_figure, png_bytes
from prunedrive.report.section import Plot, Section, Table, section_renderer
from prunedrive.app.cells import paired_diff

CLAIMS_ATTACHMENT, SENSITIVITY_ATTACHMENT = "claims", "sensitivity"
VERDICT_COLOURS = {"supported": "#2e7d32", "refuted": "#c62828"}  # anything else (inconclusive, n too small): grey
SCOPE_COLOURS = {"lm": "#1f77b4", "encoder": "#d62728", "all": "#7f7f7f"}
CLAIMS_COLUMNS = [("claim", "claim"), ("comparison", "comparison"), ("n", "n"), ("diff", "ΔDS [95% CI]"),
                  ("coll", "Δcoll/km"), ("verdict", "verdict")]
SENSITIVITY_COLUMNS = [("scope", "scope"), ("agent", "agent"), ("part", "part sparsity %"),
                       ("model", "model sparsity %"), ("n", "n"), ("drop", "DS drop [95% CI]"),
                       ("per_part", "per 10% of part"), ("per_model", "per 10% of model")]
CLAIMS_NOTE = ("Each row: mean over paired episodes (same scenario and seed) of the candidate's DS minus the "
               "baseline's, with its 95% percentile-bootstrap CI. Superiority rows: supported when the CI lies "
               "above 0, refuted when below. Non-inferiority rows (\"keeps accuracy\"): supported when the CI's "
               "lower bound is above minus the margin, refuted when its upper bound is below it. \"per 10% of the "
               "model's weights\" rows compare DS drops from dense per 10% of the model's weights removed.")
SENSITIVITY_NOTE = ("Claim (c): OWL pruning the LM, the encoder or both. DS drop: dense minus agent, paired, "
                    "positive is a loss. part: the target sparsity of the part pruned; model: the share of all "
                    "the model's weights that are zero. The drops per 10% divide the drop and its CI by those.")


@dataclass
class Claims:
    run: str
    table: pd.DataFrame
    sensitivity: pd.DataFrame | None



def claims_rows(c: Claims) -> list[dict[str, str]]:
    return [{"agent": r.comparison, "claim": str(r.claim), "comparison": r.comparison, "n": str(int(r.n)),
             "diff": paired_diff(r.ds_diff, r.ci_low, r.ci_high),
             "coll": f"{r.coll_per_km_diff:+.2f}" if np.isfinite(r.coll_per_km_diff) else "–", "verdict": r.verdict}
            for r in c.table.itertuples()]


def sensitivity_rows(c: Claims) -> list[dict[str, str]]:
    if c.sensitivity is None:
        return []
    return [{"agent": r.agent, "scope": r.scope, "part": f"{100 * r.target_sparsity:.3g}",
             "model": f"{100 * r.model_sparsity:.1f}", "n": str(int(r.n)), "drop": paired_diff(r.ds_drop, r.ci_low,
                                                                                          r.ci_high),
             "per_part": paired_diff(r.drop_per_part, r.drop_per_part_low, r.drop_per_part_high),
             "per_model": paired_diff(r.drop_per_model, r.drop_per_model_low, r.drop_per_model_high)}
            for r in c.sensitivity.itertuples()]


def plot_claims(c: Claims) -> Plot:
    name, title = f"claims_{c.run}", f"The seeds' claims: paired DS differences ({c.run})"
    table = c.table[np.isfinite(c.table["ds_diff"]) & (c.table["kind"] != "per-weight")].reset_index(drop=True)
    if table.empty:
        return Plot(name, title, None, "no comparison has paired episodes")
    figure = new_figure(8.5, 1.0 + 0.26 * len(table))
    ax = figure.add_subplot()
    y = np.arange(len(table))[::-1]
    for row, r in zip(y, table.itertuples()):
        ax.errorbar([r.ds_diff], [row], xerr=[[r.ds_diff - r.ci_low], [r.ci_high - r.ds_diff]], fmt="o", ms=4,
                    color=VERDICT_COLOURS.get(r.verdict, "#888888"), elinewidth=1.4, capsize=2)
    ax.axvline(0, color="#333333", linewidth=0.8)
    margins = table.get("margin", pd.Series(dtype=float)).dropna().unique()
    for margin in margins:
        ax.axvline(-margin, color="#333333", linewidth=0.8, linestyle=":")
    ax.set_yticks(y, [f"({r.claim}) {r.comparison}" for r in table.itertuples()], fontsize=7.5)
    ax.set_xlabel("ΔDS, candidate − baseline (95% CI)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title, fontsize=10)
    note = ("Green: supported, red: refuted, grey: inconclusive. Solid line: no difference"
            + (f"; dotted: the non-inferiority margin ({', '.join(f'−{m:g}' for m in margins)} DS) of the "
               "\"keeps accuracy\" rows" if len(margins) else "")
            + ". Per-weight rows are in the table only (other units).")
    return Plot(name, title, png_bytes(figure), note, wide=True)


def plot_sensitivity(c: Claims) -> Plot:
    name, title = f"sensitivity_{c.run}", f"Claim (c): DS drop vs the model's weights removed ({c.run})"
    table = c.sensitivity
    if table is None or table.empty or not np.isfinite(table["ds_drop"]).any():
        return Plot(name, title, None, "no sensitivity table")
    figure = new_figure(6.6, 4.2)
    ax = figure.add_subplot()
    for scope, group in table.groupby("scope", sort=False):
        colour = SCOPE_COLOURS.get(scope, "#9467bd")
        x = 100 * group["model_sparsity"]
        ax.errorbar(x, group["ds_drop"], yerr=[group["ds_drop"] - group["ci_low"], group["ci_high"] - group["ds_drop"]],
                    fmt="o", color=colour, capsize=3, label=scope)
        for r in group.itertuples():
            ax.annotate(f"{100 * r.target_sparsity:.0f}%", (100 * r.model_sparsity, r.ds_drop), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="#333333", linewidth=0.8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the model's weights removed (%)")
    ax.set_ylabel("DS drop from dense (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="scope", title_fontsize=8)
    ax.set_title(title, fontsize=10)
    note = ("Each point: OWL pruning one scope to the target sparsity written beside it. A steeper rise from the "
            "origin is a more sensitive part: the same drop for fewer weights removed.")
    return Plot(name, title, png_bytes(figure), note)



@section_renderer
def claims_section(table: pd.DataFrame, context: ReportContext) -> Section:
    """The claims of the run the attachment belongs to, with its sensitivity table when it has one."""
    sensitivity = RunDir(context.run_path).attachments().get(SENSITIVITY_ATTACHMENT)
    sensitivity = sensitivity.load() if sensitivity is not None else None
    c = Claims(context.run, table, sensitivity if sensitivity is not None and not sensitivity.empty else None)
    tables = [Table(CLAIMS_COLUMNS, claims_rows(c), CLAIMS_NOTE, id=f"claims-{c.run}")]
    if c.sensitivity is not None:
        tables.append(Table(SENSITIVITY_COLUMNS, sensitivity_rows(c), SENSITIVITY_NOTE, id=f"sensitivity-{c.run}"))
    return Section(f"The seeds' claims ({c.run})", tables, [plot_claims(c), plot_sensitivity(c)])
