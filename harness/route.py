"""A route as a polyline, and the ego's progress along it (shared by all backends)."""
from __future__ import annotations

import numpy as np

from prunedrive.harness.observation import ROUTE_POINTS, ROUTE_SPACING_M

# How far ahead of the last matched point the projection searches, in points: bounded so that a
# route crossing itself (roundabouts, loops) cannot jump ahead.
_SEARCH_AHEAD = 40


def resample(points: np.ndarray, spacing: float = ROUTE_SPACING_M) -> np.ndarray:
    """Points every `spacing` metres along the polyline through `points` (n, 2)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if len(points) < 2:
        raise ValueError("a route needs at least two points")
    seg = np.hypot(*np.diff(points, axis=0).T)
    keep = np.concatenate(([True], seg > 1e-6))
    points = points[keep]
    cum = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))))
    stations = np.append(np.arange(0.0, cum[-1], spacing), cum[-1])
    return np.stack((np.interp(stations, cum, points[:, 0]), np.interp(stations, cum, points[:, 1])), axis=1)


class RoutePolyline:
    """Dense route points and the arc length at each."""

    def __init__(self, points: np.ndarray):
        self.points = resample(points)
        self.arc = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(self.points, axis=0).T))))
        self.length = float(self.arc[-1])
        d = np.diff(self.points, axis=0)
        self.headings = np.arctan2(d[:, 1], d[:, 0])  # one per segment

    def project(self, xy: np.ndarray, start: int) -> tuple[int, float, float]:
        """Nearest segment at or after `start - 1`: (segment index, arc length, signed lateral offset).

        Lateral offset is positive to the right of the route direction.
        """
        lo = max(start - 1, 0)
        hi = min(start + _SEARCH_AHEAD, len(self.points) - 1)
        a = self.points[lo:hi]
        ab = self.points[lo + 1 : hi + 1] - a
        ab_len2 = np.maximum((ab**2).sum(axis=1), 1e-12)
        t = np.clip(((xy - a) * ab).sum(axis=1) / ab_len2, 0.0, 1.0)
        foot = a + t[:, None] * ab
        dist = np.hypot(*(xy - foot).T)
        i = int(np.argmin(dist))
        seg = lo + i
        cross = ab[i, 0] * (xy[1] - a[i, 1]) - ab[i, 1] * (xy[0] - a[i, 0])
        lateral = float(np.copysign(dist[i], cross))
        arc = float(self.arc[seg] + t[i] * np.sqrt(ab_len2[i]))
        return seg, arc, lateral

    def ahead(self, segment: int) -> np.ndarray:
        """The next ROUTE_POINTS points after the segment's start."""
        return self.points[segment + 1 : segment + 1 + ROUTE_POINTS]


def project_points(points: np.ndarray, path: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each point (n, 2) to the polyline `path` (p, 2), and the arc length of its foot."""
    a, ab = path[:-1], np.diff(path, axis=0)
    ab2 = np.maximum((ab**2).sum(axis=1), 1e-12)
    t = np.clip(((points[:, None, :] - a[None]) * ab[None]).sum(axis=2) / ab2[None], 0.0, 1.0)
    foot = a[None] + t[..., None] * ab[None]
    d = np.hypot(*(points[:, None, :] - foot).transpose(2, 0, 1))
    k = np.argmin(d, axis=1)
    rows = np.arange(len(points))
    arc = np.concatenate(([0.0], np.cumsum(np.sqrt(ab2))))
    return d[rows, k], arc[k] + t[rows, k] * np.sqrt(ab2[k])
