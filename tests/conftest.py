from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_suite(tmp_path) -> Path:
    """Three short highway episodes: fast enough for end-to-end runner tests."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: tiny\n"
        "scenarios:\n"
        "  - name: short-cruise\n"
        "    kind: highway_cruise\n"
        "    seeds: [1, 2, 3]\n"
        "    lanes: 2\n"
        "    vehicles: 4\n"
        "    speed_limit_mps: 20\n"
        "    route_length_m: 60\n"
        "    duration_s: 12\n"
    )
    return path
