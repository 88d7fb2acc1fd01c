import sys
import textwrap
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


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: thread overhead dominates, and on a shared 2-core box two threads can be 10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def importable(tmp_path, monkeypatch):
    """Write a module of test code into its own folder on sys.path: `importable(name, source) -> folder`
    (the folder also goes on a subprocess's PYTHONPATH); the module is forgotten after the test."""
    written = []

    def write(name: str, source: str) -> Path:
        folder = tmp_path / f"importable-{name}"
        folder.mkdir()
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(folder))
        written.append(name)
        return folder

    yield write
    for name in written:
        sys.modules.pop(name, None)
