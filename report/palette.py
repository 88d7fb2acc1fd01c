"""Colours and markers: one colour per pruning method on the whole page, taken from the methods the runs name
(their manifests and model cards); the dense model black, agents without a model grey."""
from __future__ import annotations

import hashlib

from prunedrive.report.data import Series

DENSE_COLOUR = "#111111"
# A qualitative palette (matplotlib's tab10 and tab20b without grey and black). A method's colour comes from a hash
# of its name, so it is the same in every report (the report holds no list of pruning methods); two methods on one
# page that hash alike take the next free colour, in name order.
METHOD_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#bcbd22", "#393b79", "#637939"]
REFERENCE_GREYS = ["#8a8a8a", "#b5b5b5", "#5f5f5f", "#d0d0d0"]
HATCHES = ["//", "..", "xx", "\\\\"]
UNKNOWN = "unknown"


def method_colours(methods: list[str]) -> dict[str, str]:
    """{method: colour}: each method's own colour (a hash of its name), the next free one where two collide."""
    taken: set[str] = set()
    colours = {}
    for method in sorted(methods):
        start = int(hashlib.sha256(method.encode()).hexdigest(), 16) % len(METHOD_PALETTE)
        ring = [METHOD_PALETTE[(start + k) % len(METHOD_PALETTE)] for k in range(len(METHOD_PALETTE))]
        colour = next((c for c in ring if c not in taken), ring[0])  # more methods than colours: share
        taken.add(colour)
        colours[method] = colour
    return colours


class Palette:
    """Colours of methods (the dense one black, the others their own: method_colours) and, per agent, its method's
    colour, lighter for lower sparsity when a method has several; reference agents in greys."""

    def __init__(self, series: list[Series]):
        methods = list(dict.fromkeys(self.method(s) for s in series if not s.reference))
        dense = {self.method(s) for s in series if s.dense}
        coloured = method_colours([m for m in methods if m not in dense])
        self.methods = {m: DENSE_COLOUR if m in dense else coloured[m] for m in methods}
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


