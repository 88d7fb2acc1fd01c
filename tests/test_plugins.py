"""Plug-ins: a small package, installed by pip inside the test, registers an agent, a simulator backend (with
its own scenario kind, scenario option and server flags) and a metric through entry points, and a second
package (a module plus its dist-info under tmp_path) a one-shot and a training pruning method;
the CLI, the runner, the summary tables and Ray workers treat them like built-ins, and nothing else changes."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.pruning import PRUNING_METHODS, find_linears, sparsity_report
from test_compress import tiny_model  # noqa: F401 -- module fixture: the trained tiny driving LLM

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

        [project.entry-points."prunedrive.backends"]
        track = "pd_plugin.track:TrackBackend"

        [project.entry-points."prunedrive.metrics"]
        sim_seconds = "pd_plugin.metrics:SIM_SECONDS"
        """,
    "pd_plugin/__init__.py": "",
    "pd_plugin/track.py": """
        # A backend of its own kind (`test_track`), driving highway-env's straight road through the built-in
        # backend, with its own scenario option (`traffic`: how many cars) and its own server flags (--track-*).
        import dataclasses

        from prunedrive.harness.backends.base import ServerOptions, SimulatorError
        from prunedrive.harness.backends.highway import HighwayBackend



        class TrackBackend:
            KINDS = ("test_track",)
            OPTIONS = ("traffic",)
            SERVER = ServerOptions("track", "Track")
            BUILT = []  # (kind driven, vehicles, host, port) of every backend made in this process

            def __init__(self, scenario, render=False, host=None, port=None):
                vehicles = int(scenario.options.get("traffic", scenario.vehicles))
                road = dataclasses.replace(scenario, kind="highway_cruise", vehicles=vehicles, options={})
                self.inner = HighwayBackend(road, render=render)
                self.BUILT.append((scenario.kind, vehicles, host, port))

            @classmethod
            def probe(cls, scenario, host=None, port=None, **_):
                if port == 1:
                    raise SimulatorError(f"no Track server answered at {host}:{port}")

            def __getattr__(self, name):  # dt, reset, step, route_polyline, render, close: the road's
                return getattr(self.inner, name)
        """,
    "pd_plugin/metrics.py": """
        from prunedrive.harness.metrics import OVERALL, Aggregate, Metric

        SIM_SECONDS = Metric("sim_seconds", "sim_seconds", "simulated seconds per episode", "sim s", "s",
                             Aggregate("nanmean", ("sim_time_s",)), fmt="{:.3f}", views=frozenset({OVERALL}))
        """,
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
                           ("pd_plugin.drivers:absent", "has no attribute 'absent'")):
        assert main(["run", "--suite", str(tiny_suite), "--out", str(tmp_path / "out"), "--agent", agent,
                     "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any run directory exists


# -- a simulator backend with its own kind, option and server flags -----------------------------------------
TRACK = """name: track
scenarios:
  - {{name: {name}, kind: {kind}, seeds: [1, 2], lanes: 2, vehicles: 4, speed_limit_mps: 20, route_length_m: 60,
     duration_s: 12{extra}}}
"""


def _suite(tmp_path, file_name, name="lap", kind="test_track", extra=", options: {traffic: 0}"):
    path = tmp_path / file_name
    path.write_text(TRACK.format(name=name, kind=kind, extra=extra))
    return path


def test_a_plugin_backend_drives_its_own_kind_with_its_own_option(installed, tmp_path):
    from prunedrive.harness.backends import backend_class, backend_for_kind, kind_table

    BUILT = backend_class("track").BUILT  # the registry's class (its module may have been imported by another test)
    assert backend_for_kind("test_track") == "track" and kind_table()["highway_cruise"] == "highway"
    BUILT.clear()
    plugin = _run(_suite(tmp_path, "t.yaml"), tmp_path, "plugin", "--agent", "expert")
    assert {kind for kind, *_ in BUILT} == {"test_track"} and {v for _, v, *_ in BUILT} == {0}  # the option arrived
    # The same road and traffic as the built-in kind with `vehicles: 0`: the plug-in drove it, and only it.
    builtin = _run(_suite(tmp_path, "h.yaml", kind="highway_cruise", extra=", vehicles: 0"), tmp_path, "builtin",
                   "--agent", "expert")
    assert (plugin.status != "failed").all() and plugin.sim_time_s.gt(0).all()
    for column in ("driving_score", "route_completion", "sim_time_s", "steps"):
        assert plugin[column].tolist() == builtin[column].tolist(), column


def test_a_plugin_backend_refuses_an_option_it_does_not_declare(installed, tmp_path, capsys):
    from prunedrive.app.cli import main

    bad = _suite(tmp_path, "bad.yaml", extra=", options: {trafic: 0}")
    assert main(["run", "--suite", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: scenarios[0] ('lap'): unknown option 'trafic'" in err and "track backend; allowed: traffic" in err
    unknown = _suite(tmp_path, "kind.yaml", kind="test_trak")
    assert main(["run", "--suite", str(unknown), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "field 'kind' is 'test_trak'; allowed: highway_cruise" in (err := capsys.readouterr().err)
    assert "test_track" in err  # the plug-in's kind is listed with the built-ins
    assert not (tmp_path / "out").exists()  # refused before any run directory exists


def test_a_plugin_backend_declares_its_server_flags(installed, tmp_path, capsys):
    from prunedrive.app.cli import main
    from prunedrive.harness.backends import backend_class

    BUILT = backend_class("track").BUILT

    suite = _suite(tmp_path, "t.yaml")
    out = ["--out", str(tmp_path / "out"), "--quiet"]
    assert main(["run", "--suite", str(suite), *out, "--track-host", "sim.local", "--track-port", "1"]) == 3
    assert "no Track server answered at sim.local:1" in capsys.readouterr().err  # the probe got host and port
    assert main(["run", "--suite", str(suite), *out, "--track-servers", "a:2000"]) == 2
    assert "--track-servers needs --workers" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", *out, "--track-port", "2000"]) == 2  # a suite without its kind
    assert "suite 'smoke' has no Track scenario" in capsys.readouterr().err
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(suite.read_text() + "  - {name: r0, kind: carla_route, options: {route_file: x.xml, route_id: '0'}}\n")
    assert main(["run", "--suite", str(mixed), *out, "--track-host", "a", "--carla-host", "b"]) == 2
    assert "server options of carla and track given together" in capsys.readouterr().err
    BUILT.clear()
    _run(suite, tmp_path, "hosted", "--track-host", "sim.local", "--track-port", "2000")
    assert {(host, port) for *_, host, port in BUILT} == {("sim.local", 2000)}  # every env's backend got them


# -- a metric -----------------------------------------------------------------------------------------------
def test_a_plugin_metric_is_in_the_one_metric_table(installed, tiny_suite, tmp_path, capsys):
    from prunedrive.app.cli import main
    from prunedrive.harness.metrics import METRICS, all_metrics, in_view, summary_columns
    from prunedrive.harness.summary import summarize

    assert all_metrics()[:len(METRICS)] == METRICS  # the built-ins first, in their order
    assert [m.key for m in all_metrics()[len(METRICS):]] == ["sim_seconds"]
    assert "sim_seconds" in summary_columns() and "sim_seconds" in [m.key for m in in_view("overall")]
    episodes = _run(tiny_suite, tmp_path, "m", "--agent", "expert")
    summary = summarize(episodes, ["agent"])
    assert summary["sim_seconds"].iloc[0] == pytest.approx(episodes.sim_time_s.mean())
    capsys.readouterr()
    assert main(["summary", "m", "--out", str(tmp_path)]) == 0
    overall = capsys.readouterr().out.split("Overall")[1]
    assert "sim s" in overall and f"{episodes.sim_time_s.mean():.3f}" in overall


def test_a_plugin_metric_cannot_take_a_builtin_name():
    from prunedrive.harness.metrics import METRICS, Aggregate, Metric, _check_metric
    from prunedrive.plugins.registry import RegistryError

    clash = Metric("episodes", "mine", "mine", "mine", "", Aggregate("count"))
    with pytest.raises(RegistryError, match="metric 'mine': episodes is a built-in metric's name"):
        _check_metric("mine", clash)
    with pytest.raises(RegistryError, match="is not a prunedrive.harness.metrics.Metric"):
        _check_metric("mine", "episodes")
    assert _check_metric("ok", Metric("mine", "mine", "mine", "mine", "", Aggregate("count"))).key == "mine"
    assert all(m.key != "mine" for m in METRICS)


def test_one_error_type_for_names_and_declarations():
    from prunedrive.agents.registry import AGENTS, AgentError, resolve_factory
    from prunedrive.harness.backends import _check_backend, backend_for_kind
    from prunedrive.plugins.registry import RegistryError
    from prunedrive.scenarios.loader import ScenarioError

    assert issubclass(AgentError, RegistryError) and AGENTS.names()[:2] == ["expert", "constant"]
    with pytest.raises(AgentError, match="unknown agent 'nope'; allowed: expert, .*, or package.module:factory"):
        resolve_factory("nope")
    with pytest.raises(AgentError, match="is not callable"):
        resolve_factory("prunedrive.harness.metrics:KM_FLOOR")
    with pytest.raises(ScenarioError, match="unknown scenario kind 'parking'; allowed: highway_cruise, .*carla_route"):
        backend_for_kind("parking")

    class Undeclared:
        KINDS = ("a",)

    with pytest.raises(RegistryError, match="'sim'.*must declare OPTIONS as a tuple of names"):
        _check_backend("sim", Undeclared)
    Undeclared.OPTIONS, Undeclared.SERVER = (), ("host", "port")
    with pytest.raises(RegistryError, match="SERVER must be a ServerOptions or None"):
        _check_backend("sim", Undeclared)


# -- pruning methods -----------------------------------------------------------------------------------------
# Pruning methods as plug-ins: a package installed inside the test (a module plus its dist-info with entry points,
# all under tmp_path) adds a one-shot method and a method that trains, and `prunedrive prune` uses both on the tiny
# driving LLM with nothing in prunedrive touched; a plug-in that is not a usable PruningMethod is refused, naming
# itself.

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = '''
import torch
import torch.nn.functional as F

from prunedrive.models.pruning import PruningMethod, find_linears
from prunedrive.models.pruning.method import LinearRule


def zero_odd_columns(linear, stats, sparsity, nm):
    linear.weight.data[:, 1::2] = 0


def every_other(model, request):
    """One-shot: zero every other input column of each Linear in scope (exactly half of it)."""
    for linear in find_linears(model).values():
        zero_odd_columns(linear, None, request.sparsity, None)
    return None


def short_fit(model, request):
    """Trains: a few SGD steps of its own on the family's batches, then |W| pruning to the target in each layer."""
    training = request.training
    data = training.data(4, 2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    with training.running(model):
        model.train()
        for batch in data.train(0):
            logits, labels = training.forward(model, batch)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    with torch.no_grad():
        for linear in find_linears(model, training.plan.exclude).values():
            w = linear.weight
            k = int(request.sparsity * w.numel())
            w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
    return {"history": [{"phase": "fit", "train_loss": x} for x in losses], "train_steps": len(losses),
            "data": data.description}


def make():
    return every_other


EVERY_OTHER = PruningMethod("everyother", every_other, calibrated=False, linear=LinearRule(None, zero_odd_columns))
SHORT_FIT = PruningMethod("shortfit", short_fit, calibrated=False, trains=True)
OLD_SHAPE = PruningMethod("oldshape", lambda lm, calibration, sparsity, pattern: None, calibrated=False)
'''

ENTRY_POINTS = """
[prunedrive.pruning]
everyother = pd_prune_plugin.methods:EVERY_OTHER
shortfit = pd_prune_plugin.methods:SHORT_FIT
oldshape = pd_prune_plugin.methods:OLD_SHAPE
notamethod = pd_prune_plugin.methods:make
"""


@pytest.fixture
def pruning_plugins(tmp_path, monkeypatch):
    """The plug-in package and its dist-info in tmp_path, on sys.path for this test only."""
    site = tmp_path / "site"
    (site / "pd_prune_plugin").mkdir(parents=True)
    (site / "pd_prune_plugin" / "__init__.py").write_text("")
    (site / "pd_prune_plugin" / "methods.py").write_text(textwrap.dedent(METHODS))
    info = site / "pd_prune_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pd-prune-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(PRUNING_METHODS, "_loaded", dict(PRUNING_METHODS._loaded))  # forget them afterwards
    yield site
    for name in [m for m in sys.modules if m.startswith("pd_prune_plugin")]:
        del sys.modules[name]


def _prune(model, out, method, *argv):
    from prunedrive.app.cli import main

    return main(["prune", "--method", method, "--sparsity", "0.5", "--model", str(model), "--model-out", str(out),
                 *argv])


def test_a_one_shot_plugin_method_prunes_through_the_command(pruning_plugins, tiny_model, tmp_path):
    assert "everyother" in PRUNING_METHODS.names()
    out = tmp_path / "everyother"
    assert _prune(tiny_model, out, "everyother") == 0
    card = json.loads((out / "sparsity.json").read_text())
    assert card["method"] == "everyother" and card["calibration"] == "none"
    model = DrivingLLM.from_pretrained(out)
    assert card["lm_global"] == pytest.approx(0.5) == sparsity_report(model.lm)["global"]
    for name, linear in find_linears(model.lm).items():
        assert not linear.weight[:, 1::2].any(), name  # the plug-in's own pattern, not a magnitude mask
    assert sparsity_report(model.encoder, ())["global"] < 0.05  # scope lm: the family gave it the LM only


def test_the_encoder_is_pruned_by_what_the_plugin_declares(pruning_plugins, tiny_model, tmp_path, capsys):
    out = tmp_path / "all"
    assert _prune(tiny_model, out, "everyother", "--scope", "all") == 0
    model = DrivingLLM.from_pretrained(out)
    for name, linear in [*find_linears(model.encoder, ()).items(), *find_linears(model.lm).items()]:
        assert not linear.weight[:, 1::2].any(), name  # its LinearRule, layer by layer, in both parts
    assert json.loads((out / "sparsity.json").read_text())["parts"]["encoder"] == pytest.approx(0.5, abs=0.01)
    # a method without such a rule cannot prune the encoder; the message lists what can, the plug-in included
    assert _prune(tiny_model, tmp_path / "depth", "depth", "--scope", "encoder") == 2
    assert "the encoder can be pruned by magnitude, wanda, sparsegpt, owl, everyother, not depth" in \
        capsys.readouterr().err


def test_a_training_plugin_method_gets_the_familys_training(pruning_plugins, tiny_model, tmp_path):
    out = tmp_path / "shortfit"
    assert _prune(tiny_model, out, "shortfit") == 0
    card = json.loads((out / "sparsity.json").read_text())
    assert card["method"] == "shortfit" and card["train_steps"] == 2 and len(card["history"]) == 2
    assert card["calibration"].startswith("none (driving data's train split, 2 batches of 4")
    pruned, dense = DrivingLLM.from_pretrained(out), DrivingLLM.from_pretrained(tiny_model)
    assert card["lm_global"] == pytest.approx(0.5, abs=0.01)
    assert sparsity_report(pruned.encoder, ())["global"] < 0.05  # the plan's exclude kept it to the LM
    # it trained: weights it kept moved away from the dense ones (a prune alone keeps them equal)
    kept = [(a.weight, b.weight) for a, b in zip(find_linears(pruned.lm).values(), find_linears(dense.lm).values())]
    assert any(not torch.equal(a[a != 0], b[a != 0]) for a, b in kept)
    assert not (out / "dg2pf-checkpoint").exists()


@pytest.mark.parametrize("name, message", [("oldshape", "run must take (model, request)"),
                                           ("notamethod", "is a function, not a")])
def test_a_plugin_that_is_not_a_usable_method_is_refused_naming_it(pruning_plugins, tiny_model, tmp_path, capsys, name,
                                                                    message):
    assert _prune(tiny_model, tmp_path / name, name) == 2
    err = capsys.readouterr().err
    assert f"pruning method {name!r} (plug-in pd_prune_plugin.methods:" in err and message in err
    assert not (tmp_path / name).exists()


def test_a_broken_backend_plugin_hides_no_other_kind_and_is_named_when_a_kind_is_unknown(monkeypatch):
    from prunedrive.harness.backends import BACKENDS, backend_for_kind, kind_table
    from prunedrive.scenarios.loader import ScenarioError

    monkeypatch.setitem(BACKENDS._entries, "broken", "no_such_simulator_module:Backend")
    assert backend_for_kind("highway_cruise") == "highway" and kind_table()["carla_route"] == "carla"
    with pytest.raises(ScenarioError, match=r"allowed: highway_cruise.*not loaded: .*'broken'.*no_such_simulator_module"):
        backend_for_kind("no_such_kind")
