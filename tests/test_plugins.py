"""Plug-ins: a small package, installed by pip inside the test, registers an agent and a pruning method
through entry points; the CLI, the runner and Ray workers treat them like built-ins."""
import subprocess
import sys
import textwrap

import pytest

PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "pd-plugin"
        version = "0.1"

        [project.entry-points."prunedrive.agents"]
        cruiser = "pd_plugin.drivers:make"

        [project.entry-points."prunedrive.pruning"]
        everyother = "pd_plugin.everyother:METHOD"
        """,
    "pd_plugin/__init__.py": "",
    "pd_plugin/drivers.py": """
        from prunedrive.harness.action import Control


        class Cruise:
            name = "cruiser"

            def __init__(self, throttle):
                self.control = Control(throttle=throttle)

            def reset(self, scenario):
                pass

            def act(self, observation):
                return self.control


        def make(throttle=0.4):
            return Cruise(float(throttle))
        """,
    "pd_plugin/everyother.py": """
        import torch

        from prunedrive.models.pruning import PruningMethod, find_linears


        def run(lm, calibration, sparsity, pattern, **kwargs):
            # Zero every other weight of each row: exactly 50%, whatever the values.
            for linear in find_linears(lm).values():
                mask = torch.ones_like(linear.weight, dtype=torch.bool)
                mask[:, ::2] = False
                linear.weight.data[~mask] = 0
            return None


        METHOD = PruningMethod("everyother", run, calibrated=False)
        """,
}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    source, site = tmp_path_factory.mktemp("pkg"), tmp_path_factory.mktemp("site")
    for name, text in PACKAGE.items():
        path = source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True)
    return site


@pytest.fixture
def installed(plugin_site, monkeypatch):
    """The plug-in on sys.path (and PYTHONPATH, for Ray's worker processes)."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("PYTHONPATH", str(plugin_site))
    yield plugin_site
    for name in [m for m in sys.modules if m.startswith("pd_plugin")]:
        del sys.modules[name]


def _run(tiny_suite, tmp_path, run_id, *argv):
    from prunedrive.app.cli import main
    from prunedrive.harness.results import RunDir

    assert main(["run", "--suite", str(tiny_suite), "--out", str(tmp_path), "--run-id", run_id, "--quiet",
                 "--seeds", "1", "2", *argv]) == 0
    return RunDir(tmp_path / run_id).episodes().sort_values("seed")


def test_an_agent_by_module_reference_and_by_entry_point(installed, tiny_suite, tmp_path):
    from prunedrive.agents.registry import agent_names

    assert "cruiser" in agent_names()
    by_reference = _run(tiny_suite, tmp_path, "a", "--agent", "pd_plugin.drivers:make", "--agent-arg", "throttle=0.3")
    by_entry_point = _run(tiny_suite, tmp_path, "b", "--agent", "cruiser", "--agent-arg", "throttle=0.3")
    assert set(by_reference.agent) == set(by_entry_point.agent) == {"cruiser"}
    assert by_reference.driving_score.tolist() == by_entry_point.driving_score.tolist()
    assert (by_reference.status != "failed").all()
    faster = _run(tiny_suite, tmp_path, "c", "--agent", "cruiser", "--agent-arg", "throttle=1.0")
    assert faster.route_completion.tolist() != by_entry_point.route_completion.tolist() or \
        faster.sim_time_s.tolist() != by_entry_point.sim_time_s.tolist()  # the argument reached the factory


@pytest.mark.ray
def test_a_plugin_agent_on_ray_workers(installed, tiny_suite, tmp_path):
    pytest.importorskip("ray")
    in_process = _run(tiny_suite, tmp_path, "local", "--agent", "cruiser")
    on_ray = _run(tiny_suite, tmp_path, "ray", "--agent", "cruiser", "--workers", "2")
    assert on_ray.driving_score.tolist() == in_process.driving_score.tolist()


def test_unknown_and_broken_agents_are_messages(installed, tiny_suite, tmp_path, capsys):
    from prunedrive.app.cli import main

    for agent, message in (("nope", "unknown agent 'nope'"), ("pd_plugin.missing:make", "cannot import"),
                           ("pd_plugin.drivers:absent", "has no callable 'absent'")):
        assert main(["run", "--suite", str(tiny_suite), "--out", str(tmp_path / "out"), "--agent", agent,
                     "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any run directory exists


def test_a_pruning_method_by_entry_point(installed):
    import torch

    from prunedrive.app.cli import build_parser
    from prunedrive.models.pruning import find_linears, prune, pruning_methods

    assert "everyother" in pruning_methods()
    assert "everyother" in build_parser().parse_args(
        ["prune", "--method", "everyother", "--sparsity", "0.5", "--model", "m", "--model-out", "o"]).method
    lm = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    report = prune(lm, "everyother", 0.5)
    assert report["method"] == "everyother"
    for linear in find_linears(lm).values():
        assert float((linear.weight == 0).float().mean()) == 0.5
