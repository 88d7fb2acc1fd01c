"""CARLA Leaderboard 2.0 route files: their XML format, read safely, and the route weather.

Route file format (carla-simulator/leaderboard ``data/routes_*.xml``)::

    <routes>
      <route id="0" town="Town12">
        <weathers><weather route_percentage="0" cloudiness="5.0" .../> ...</weathers>
        <waypoints><position x="983.5" y="5382.2" z="371"/> ...</waypoints>
        <scenarios>
          <scenario name="Accident_1" type="Accident">
            <trigger_point x="427.2" y="6086.8" z="359" yaw="144"/>
            <distance value="100"/>            <!-- any other child: a parameter -->
          </scenario>
        </scenarios>
      </route>
    </routes>

The file is read with defusedxml's SAX reader, which refuses entity declarations (billion laughs,
external entities), and through a locator so that every error names ``file:line``. The key points a
route gives become a lane-level route on a map in carla_route_planner.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from xml.sax.handler import ContentHandler

import numpy as np

# Every carla.WeatherParameters field, with the value of carla.WeatherParameters() (0.9.16).
WEATHER_DEFAULTS: dict[str, float] = {
    "cloudiness": 0.0, "precipitation": 0.0, "precipitation_deposits": 0.0, "wind_intensity": 0.0,
    "sun_azimuth_angle": 0.0, "sun_altitude_angle": 0.0, "fog_density": 0.0, "fog_distance": 0.0,
    "wetness": 0.0, "fog_falloff": 0.0, "scattering_intensity": 0.0, "mie_scattering_scale": 0.0,
    "rayleigh_scattering_scale": 0.0331, "dust_storm": 0.0,
}
# The Leaderboard's route_parser starts every <weather> from this base and overrides what it names.
BASE_WEATHER = {**WEATHER_DEFAULTS, "sun_altitude_angle": 70.0, "cloudiness": 50.0}


class RouteFileError(ValueError):
    """A route file that cannot be used; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Weather:
    route_percentage: float
    params: dict[str, float]  # every WEATHER_DEFAULTS key


@dataclass(frozen=True)
class RouteScenario:
    name: str
    type: str
    trigger: tuple[float, float, float, float]  # x, y, z, yaw (degrees)
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # child tag -> its attributes


@dataclass(frozen=True)
class RouteSpec:
    id: str
    town: str
    weathers: tuple[Weather, ...]  # sorted by route_percentage
    waypoints: tuple[tuple[float, float, float], ...]
    scenarios: tuple[RouteScenario, ...]
    source: str = ""
    line: int = 0

    def weather_at(self, percentage: float) -> dict[str, float]:
        return weather_at(self.weathers, percentage)


def weather_at(weathers: Sequence[Weather], percentage: float) -> dict[str, float]:
    """The weather at a route percentage, as the Leaderboard's RouteWeatherBehavior: linear between
    the two surrounding <weather> key points, the nearest one's before the first and after the last."""
    if not weathers:
        return dict(BASE_WEATHER)
    xs = [w.route_percentage for w in weathers]
    return {k: float(np.interp(percentage, xs, [w.params[k] for w in weathers])) for k in WEATHER_DEFAULTS}


# -- parsing ---------------------------------------------------------------------------------------
@dataclass
class _Node:
    tag: str
    attrib: dict[str, str]
    line: int
    children: list["_Node"] = field(default_factory=list)


class _TreeBuilder(ContentHandler):
    """Builds a tiny element tree whose nodes remember their line."""

    def __init__(self):
        super().__init__()
        self.locator = None
        self.stack: list[_Node] = []
        self.root: _Node | None = None

    def setDocumentLocator(self, locator):  # noqa: N802 -- SAX API
        self.locator = locator

    def line(self) -> int:
        return self.locator.getLineNumber() if self.locator is not None else 0

    def startElement(self, name, attrs):  # noqa: N802
        node = _Node(name, dict(attrs), self.line())
        if self.stack:
            self.stack[-1].children.append(node)
        else:
            self.root = node
        self.stack.append(node)

    def endElement(self, name):  # noqa: N802
        self.stack.pop()


def _read_tree(path: Path) -> _Node:
    from defusedxml import DefusedXmlException
    from defusedxml.expatreader import create_parser
    from xml.sax import SAXParseException

    builder = _TreeBuilder()
    parser = create_parser()
    parser.setContentHandler(builder)
    try:
        with open(path, "rb") as f:
            parser.parse(f)
    except OSError as exc:
        raise RouteFileError(f"{path}: cannot read the route file: {exc.strerror or exc}") from None
    except SAXParseException as exc:
        raise RouteFileError(f"{path}:{exc.getLineNumber()}: not well-formed XML: {exc.getMessage()}") from None
    except DefusedXmlException as exc:  # entity or DTD declarations: refused, never expanded
        raise RouteFileError(f"{path}:{builder.line()}: refused: {exc} (route files may not declare "
                             "entities or DTDs)") from None
    if builder.root is None:
        raise RouteFileError(f"{path}:1: empty route file")
    return builder.root


class _Where:
    def __init__(self, path: Path):
        self.path = path

    def error(self, node: _Node, message: str) -> RouteFileError:
        return RouteFileError(f"{self.path}:{node.line}: <{node.tag}>: {message}")

    def attr(self, node: _Node, name: str) -> str:
        if name not in node.attrib:
            raise self.error(node, f"missing attribute {name!r}")
        return node.attrib[name]

    def number(self, node: _Node, name: str) -> float:
        text = self.attr(node, name)
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise self.error(node, f"attribute {name!r} must be a finite number, got {text!r}")
        return value

    def children(self, node: _Node, allowed: tuple[str, ...]) -> list[_Node]:
        for child in node.children:
            if child.tag not in allowed:
                raise self.error(child, f"unexpected element inside <{node.tag}>; allowed: {', '.join(allowed)}")
        return node.children


def parse_routes(path: str | Path) -> dict[str, RouteSpec]:
    """Every route of a Leaderboard 2.0 route file, by id, in file order. Errors: RouteFileError."""
    path = Path(path)
    root = _read_tree(path)
    at = _Where(path)
    if root.tag != "routes":
        raise at.error(root, "the root element must be <routes>")
    routes: dict[str, RouteSpec] = {}
    for node in at.children(root, ("route",)):
        route = _parse_route(node, at)
        if route.id in routes:
            raise at.error(node, f"route id {route.id!r} is repeated (first at line {routes[route.id].line})")
        routes[route.id] = route
    if not routes:
        raise at.error(root, "no <route> in the file")
    return routes


def load_route(path: str | Path, route_id: str | int) -> RouteSpec:
    routes = parse_routes(path)
    if str(route_id) not in routes:
        raise RouteFileError(f"{path}: no route with id {str(route_id)!r}; ids: {', '.join(routes)}")
    return routes[str(route_id)]


def _parse_route(node: _Node, at: _Where) -> RouteSpec:
    route_id, town = at.attr(node, "id"), at.attr(node, "town")
    parts: dict[str, _Node] = {}
    for child in at.children(node, ("weathers", "waypoints", "scenarios")):
        if child.tag in parts:
            raise at.error(child, f"repeated inside route {route_id!r}")
        parts[child.tag] = child

    weathers = []
    for w in at.children(parts["weathers"], ("weather",)) if "weathers" in parts else []:
        params = dict(BASE_WEATHER)
        for name in w.attrib:
            if name != "route_percentage" and name not in WEATHER_DEFAULTS:
                raise at.error(w, f"unknown weather parameter {name!r}; allowed: route_percentage, "
                                  f"{', '.join(WEATHER_DEFAULTS)}")
            if name != "route_percentage":
                params[name] = at.number(w, name)
        percentage = at.number(w, "route_percentage")
        if not 0.0 <= percentage <= 100.0:
            raise at.error(w, f"route_percentage must be in [0, 100], got {percentage:g}")
        weathers.append(Weather(percentage, params))
    weathers.sort(key=lambda w: w.route_percentage)

    if "waypoints" not in parts:
        raise at.error(node, f"route {route_id!r} has no <waypoints>")
    positions = at.children(parts["waypoints"], ("position",))
    if len(positions) < 2:
        raise at.error(parts["waypoints"], f"route {route_id!r} needs at least two <position> elements")
    waypoints = tuple((at.number(p, "x"), at.number(p, "y"), at.number(p, "z")) for p in positions)

    scenarios = []
    for s in at.children(parts["scenarios"], ("scenario",)) if "scenarios" in parts else []:
        name, kind = at.attr(s, "name"), at.attr(s, "type")
        triggers = [c for c in s.children if c.tag == "trigger_point"]
        if len(triggers) != 1:
            raise at.error(s, f"scenario {name!r} needs exactly one <trigger_point>")
        t = triggers[0]
        trigger = (at.number(t, "x"), at.number(t, "y"), at.number(t, "z"), at.number(t, "yaw"))
        params = {c.tag: dict(c.attrib) for c in s.children if c.tag != "trigger_point"}
        scenarios.append(RouteScenario(name, kind, trigger, params))
    return RouteSpec(route_id, town, tuple(weathers), waypoints, tuple(scenarios), str(at.path), node.line)
