"""Colours and markers: one colour per pruning method on the whole page, taken from the methods the runs name
(their manifests and model cards), in the report's order; the dense model black, agents without a model grey."""
from __future__ import annotations

from prunedrive.report.data import Series

DENSE_COLOUR = "#111111"
# A qualitative palette (matplotlib's tab10 and tab20b without grey and black), handed out to the methods in the
# order they appear in the report: the report holds no list of pruning methods.
METHOD_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#bcbd22", "#393b79", "#637939"]
REFERENCE_GREYS = ["#8a8a8a", "#b5b5b5", "#5f5f5f", "#d0d0d0"]
HATCHES = ["//", "..", "xx", "\\\\"]
UNKNOWN = "unknown"


class Palette:
    """Colours of methods (the dense one black, the others in order of appearance) and, per agent, its method's
    colour, lighter for lower sparsity when a method has several; reference agents in greys."""

    def __init__(self, series: list[Series]):
        methods = list(dict.fromkeys(self.method(s) for s in series if not s.reference))
        dense = {self.method(s) for s in series if s.dense}
        colours = iter(METHOD_PALETTE * (len(methods) // len(METHOD_PALETTE) + 1))
        self.methods = {m: DENSE_COLOUR if m in dense else next(colours) for m in methods}
        references = [s.label for s in series if s.reference]
        self.agents = {label: REFERENCE_GREYS[i % len(REFERENCE_GREYS)] for i, label in enumerate(references)}
        # Bars side by side need one look per agent: hatched for reference agents and for a second agent of
        # the same method and sparsity (the same model in several runs).
        self.hatches = {label: HATCHES[i % len(HATCHES)] for i, label in enumerate(references)}
        for method in methods:
            members = [s for s in series if not s.reference and self.method(s) == method]
            levels = sorted({s.sparsity or 0.0 for s in members})
            seen: dict[float, int] = {}
            for s in members:  # the sparsest darkest
                rank = levels.index(s.sparsity or 0.0)
                lighten = 0.55 * (len(levels) - 1 - rank) / (len(levels) - 1) if len(levels) > 1 else 0.0
                self.agents[s.label] = _blend(self.methods[method], lighten)
                seen[s.sparsity or 0.0] = seen.get(s.sparsity or 0.0, -1) + 1
                if seen[s.sparsity or 0.0]:
                    self.hatches[s.label] = HATCHES[(seen[s.sparsity or 0.0] - 1) % len(HATCHES)]

    @staticmethod
    def method(s: Series) -> str:
        return s.method or UNKNOWN

    def of(self, s: Series) -> str:
        """The agent's method's colour (grey for a reference agent)."""
        return self.methods.get(self.method(s), "#777777") if not s.reference else self.agents[s.label]

    def shade(self, s: Series) -> str:
        """The agent's own shade of its method's colour (lighter: less sparse), for bars side by side."""
        return self.agents.get(s.label, self.of(s))


def _blend(colour: str, white: float) -> str:
    from matplotlib.colors import to_hex, to_rgb

    return to_hex([c + (1 - c) * white for c in to_rgb(colour)])


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">"]


def markers(series: list[Series]) -> dict[str, str]:
    """A marker per sparsity (dense: a star), so that points of one method differ by shape too."""
    levels = sorted({s.sparsity for s in series if s.sparsity is not None and not s.dense})
    by_level = {level: MARKERS[i % len(MARKERS)] for i, level in enumerate(levels)}
    return {s.label: "*" if s.dense else by_level.get(s.sparsity, "o") for s in series}


