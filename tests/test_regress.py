"""The regression gate on synthetic runs with known answers, its exit codes and the pytest helper."""
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prunedrive.harness.env import EpisodeOutcome
from prunedrive.harness.events import Event, EventKind
from prunedrive.harness.paired import paired_bootstrap_ci
from prunedrive.harness.regress import RegressInputError, assert_no_regression, compare, regress
from prunedrive.harness.results import RunDir, episode_key
from prunedrive.harness.rows import episode_row
from prunedrive.scenarios.loader import Scenario

KINDS = ("highway_cruise", "dense_highway", "roundabout", "intersection")


def make_run(path: Path, agent: str, scores, *, suite: str = "synth", collisions=None, wall_ms=1.0,
             config: dict | None = None, video_keys=(), compute: dict | None = None) -> Path:
    """A run directory whose episodes are the real rows (`episode_row`) of synthetic outcomes.

    scores: {(scenario, seed): driving score}; with no infraction the driving score is the route
    completion. collisions: {(scenario, seed): n} vehicle collisions (the score is then RC x 0.6^n).
    wall_ms: per-step agent time (a number, or {(scenario, seed): ms}). compute: extra per-step fields
    (effective_flops, executed_flops, params, nonzero_params, parse_failed). video_keys: episodes that get a videos/<key>.webm file."""
    run = RunDir(path)
    if not run.manifest_path.exists():
        run.create({"suite": suite, "agents": [agent], "model": None, **(config or {})}, [])
    for i, ((scenario, seed), score) in enumerate(scores.items()):
        n_coll = (collisions or {}).get((scenario, seed), 0)
        events = [Event(EventKind.COLLISION_VEHICLE, step=5 + k) for k in range(n_coll)]
        ms = wall_ms[(scenario, seed)] if isinstance(wall_ms, dict) else wall_ms
        outcome = EpisodeOutcome(route_completion=float(score), route_length_m=500.0, events=events,
                                 collision_ended=False, sim_time_s=20.0, efficiency=80.0, comfort=90.0, steps=10)
        steps = pd.DataFrame({"agent_wall_s": np.full(10, ms / 1000), "agent_cpu_s": np.full(10, ms / 1000),
                              "sim_wall_s": np.full(10, 0.002)})
        for name in ("tokens_in", "tokens_out", "dense_flops", "effective_flops", "executed_flops", "params", "nonzero_params",
                     "peak_mem_bytes", "parse_failed"):
            steps[name] = (compute or {}).get(name, np.nan)
        kind = KINDS[zlib.crc32(scenario.encode()) % len(KINDS)] if scenario not in KINDS else scenario
        row = episode_row(outcome, steps, run_id=path.name, agent=agent,
                          scenario=Scenario(name=scenario, kind=kind, seeds=(seed,)), seed=seed, wall_s=1.0)
        key = episode_key(agent, scenario, seed)
        run.write_episode(key, row, steps)
        if key in video_keys or (scenario, seed) in video_keys:
            (path / "videos").mkdir(exist_ok=True)
            (path / "videos" / f"{key}.webm").write_bytes(b"not really a video")
    return path


def episodes(n_scenarios=3, seeds=(1, 2, 3, 4)):
    return [(f"scn{i}", s) for i in range(n_scenarios) for s in seeds]


def test_identical_runs_no_regression_and_a_ci_around_zero(tmp_path):
    rng = np.random.default_rng(1)
    scores = {e: float(rng.uniform(40, 100)) for e in episodes()}
    base = make_run(tmp_path / "base", "expert", scores)
    cand = make_run(tmp_path / "cand", "expert", scores)
    verdict = regress(base, cand)
    ds = verdict.check("driving score")
    assert verdict.n_paired == 12 and ds.diff == 0 and ds.ci_low == 0 == ds.ci_high
    assert not verdict.regression and verdict.exit_code == 0


def test_a_candidate_20_points_worse_everywhere_is_a_regression(tmp_path):
    rng = np.random.default_rng(2)
    scores = {e: float(rng.uniform(40, 80)) for e in episodes()}
    base = make_run(tmp_path / "base", "expert", scores)
    cand = make_run(tmp_path / "cand", "llm-pruned", {e: s - 20 for e, s in scores.items()})
    verdict = regress(base, cand, max_drop=5)
    ds = verdict.check("driving score")
    assert ds.diff == pytest.approx(-20) and ds.ci_high == pytest.approx(-20)
    assert verdict.regression and verdict.exit_code == 1
    assert verdict.candidate_agent == "llm-pruned" and verdict.baseline_agent == "expert"
    with pytest.raises(AssertionError, match="significant regression"):
        assert_no_regression(base, cand, max_drop=5)
    # ... but not when the margin is wider than the drop
    assert not regress(base, cand, max_drop=25).regression


def _table(agent, scores, wall_ms=1.0):
    return pd.DataFrame([{"agent": agent, "scenario": scn, "seed": seed, "driving_score": ds, "collisions": 0,
                          "km_driven": 0.4, "agent_wall_s_p50": wall_ms / 1000} for (scn, seed), ds in scores.items()])


def test_noise_only_is_not_a_regression(tmp_path):
    """Zero-mean noise on every episode: the CI straddles 0 and the gate stays quiet."""
    rng = np.random.default_rng(3)
    scores = {e: float(rng.uniform(30, 70)) for e in episodes(10, (1, 2, 3))}
    base = _table("expert", scores)
    for trial in range(40):
        noise = rng.normal(0, 10, len(scores))
        noise -= noise.mean()  # a candidate exactly as good on average
        cand = _table("expert", {e: s + d for (e, s), d in zip(scores.items(), noise)})
        verdict = compare(base, cand, n_boot=2000, seed=trial)
        ds = verdict.check("driving score")
        assert ds.ci_low < 0 < ds.ci_high
        assert not verdict.regression
    # The same through run directories on disk.
    noisy = {e: s + d for (e, s), d in zip(scores.items(), rng.normal(0, 3, len(scores)))}
    assert regress(make_run(tmp_path / "b", "expert", scores), make_run(tmp_path / "c", "expert", noisy)).exit_code == 0


def test_false_alarm_rate_on_noise_is_at_most_alpha():
    """Noise without centring: a significant drop beyond the margin should be rare (<< alpha)."""
    rng = np.random.default_rng(5)
    scores = {e: 50.0 for e in episodes(6, (1, 2, 3, 4, 5))}
    base = _table("expert", scores)
    flagged = sum(compare(base, _table("expert", {e: 50 + rng.normal(0, 15) for e in scores}), n_boot=1000,
                          seed=t).regression for t in range(100))
    assert flagged <= 5


def test_a_small_but_consistent_drop_is_significant_yet_below_the_margin(tmp_path):
    scores = {e: 60.0 + i for i, e in enumerate(episodes())}
    base = make_run(tmp_path / "base", "expert", scores)
    cand = make_run(tmp_path / "cand", "expert", {e: s - 2 for e, s in scores.items()})
    ds = regress(base, cand).check("driving score")
    assert ds.ci_high < 0 and not ds.regressed  # significant, not large enough: the margin decides


def test_bootstrap_ci_covers_the_known_mean():
    rng = np.random.default_rng(4)
    d = rng.normal(-3.0, 4.0, 400)
    low, high = paired_bootstrap_ci(d, alpha=0.05, n_boot=4000, seed=0)
    se = 4.0 / np.sqrt(400)
    assert low < -3.0 < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal-theory width


def test_more_collisions_per_km_is_a_regression(tmp_path):
    eps = episodes()
    base = make_run(tmp_path / "base", "expert", {e: 100.0 for e in eps})
    # Same route completion, 2 collisions in every episode: 4 per km; the score drops too (x0.36).
    cand = make_run(tmp_path / "cand", "expert", {e: 100.0 for e in eps}, collisions={e: 2 for e in eps})
    verdict = regress(base, cand, max_drop=100)  # the score check alone would pass
    col = verdict.check("collisions/km")
    assert col.baseline == 0 and col.candidate == pytest.approx(4.0) and col.regressed
    assert verdict.exit_code == 1


def test_per_step_cost(tmp_path):
    eps = episodes()
    base = make_run(tmp_path / "base", "dense", {e: 80.0 for e in eps}, wall_ms=10.0)
    slow = make_run(tmp_path / "slow", "pruned", {e: 80.0 for e in eps}, wall_ms=30.0)
    fast = make_run(tmp_path / "fast", "pruned", {e: 80.0 for e in eps}, wall_ms=5.0)
    cost = regress(base, slow, max_slowdown=1.5).check("agent ms/step (p50)")
    assert cost.diff == pytest.approx(3.0) and cost.regressed and cost.cells()[0] == "×3"
    reported = regress(base, slow)  # by default: reported, not a gate
    assert not reported.regression and not reported.check("agent ms/step (p50)").gating
    assert regress(base, fast, max_slowdown=1.5).check("agent ms/step (p50)").diff == pytest.approx(0.5)
    assert not regress(base, fast, max_slowdown=1.5).regression


def test_unpaired_episodes_are_ignored_and_counted(tmp_path):
    base = make_run(tmp_path / "base", "expert", {e: 70.0 for e in episodes(3)})
    cand = make_run(tmp_path / "cand", "expert", {e: 70.0 for e in episodes(2)})
    verdict = regress(base, cand)
    assert (verdict.n_paired, verdict.baseline_only, verdict.candidate_only) == (8, 4, 0)


def test_several_agents_need_agent(tmp_path):
    run = tmp_path / "run"
    make_run(run, "expert", {e: 90.0 for e in episodes()})
    make_run(run, "constant", {e: 20.0 for e in episodes()})
    with pytest.raises(RegressInputError, match="several agents"):
        regress(run, run)
    assert regress(run, run, agent="expert").check("driving score").diff == 0
    assert regress(run, run, baseline_agent="expert", candidate_agent="constant").regression


@pytest.mark.parametrize("case, message", [
    ("missing", "no run directory"),
    ("suite", "different suites"),
    ("disjoint", "no common episodes"),
    ("agent", "has no agent"),
    ("empty", "no finished episodes"),
])
def test_unusable_input_is_exit_2_with_a_message(tmp_path, capsys, case, message):
    from prunedrive.app.cli import main

    base = make_run(tmp_path / "base", "expert", {e: 70.0 for e in episodes(2)})
    if case == "missing":
        cand = tmp_path / "nope"
    elif case == "suite":
        cand = make_run(tmp_path / "cand", "expert", {e: 70.0 for e in episodes(2)}, suite="other")
    elif case == "disjoint":
        cand = make_run(tmp_path / "cand", "expert", {("elsewhere", 9): 70.0, ("elsewhere", 8): 70.0})
    elif case == "empty":
        RunDir(tmp_path / "cand").create({"suite": "synth"}, [])
        cand = tmp_path / "cand"
    else:
        cand = make_run(tmp_path / "cand", "expert", {e: 70.0 for e in episodes(2)})
    extra = ["--agent", "llm"] if case == "agent" else []
    assert main(["regress", str(base), str(cand), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_exit_codes_and_table(tmp_path, capsys):
    from prunedrive.app.cli import main

    scores = {e: 50.0 + i for i, e in enumerate(episodes())}
    base = make_run(tmp_path / "base", "expert", scores)
    same = make_run(tmp_path / "same", "expert", scores)
    make_run(tmp_path / "worse", "constant", {e: s - 30 for e, s in scores.items()})
    out = tmp_path / "verdict.json"
    assert main(["regress", str(base), str(same), "--json", str(out)]) == 0
    assert "no significant regression" in capsys.readouterr().out
    assert main(["regress", "base", "worse", "--out", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "REGRESSION" in text and "driving score" in text and "-30" in text
    import json

    assert json.loads(out.read_text())["regression"] is False


def test_pytest_plugin_fixture(tmp_path):
    """The plugin as pytest loads it (its pytest11 entry point, or -p before that is installed): the fixture gates."""
    import os
    import subprocess
    import sys
    from importlib.metadata import entry_points

    scores = {e: 60.0 + i for i, e in enumerate(episodes())}
    make_run(tmp_path / "base", "expert", scores)
    make_run(tmp_path / "same", "expert", scores)
    make_run(tmp_path / "worse", "expert", {e: s - 20 for e, s in scores.items()})
    (tmp_path / "test_gate.py").write_text(
        "import pytest\n"
        "def test_same(assert_no_regression):\n"
        f"    assert assert_no_regression({str(tmp_path / 'base')!r}, {str(tmp_path / 'same')!r}).exit_code == 0\n"
        "def test_worse(assert_no_regression):\n"
        "    with pytest.raises(AssertionError, match='significant regression'):\n"
        f"        assert_no_regression({str(tmp_path / 'base')!r}, {str(tmp_path / 'worse')!r}, max_drop=5)\n")
    # Installed with its pytest11 entry point, pytest loads it by itself (and -p would register it twice).
    installed = any(ep.value.split(":")[0] == "prunedrive.harness.pytest_plugin" for ep in entry_points(group="pytest11"))
    load = [] if installed and not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else ["-p", "prunedrive.harness.pytest_plugin"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", *load, "-p", "no:cacheprovider",
                             str(tmp_path / "test_gate.py")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


# -- exit 2, always, for input that cannot give a verdict ------------------------------------------------

def _cli(*argv) -> int:
    from prunedrive.app.cli import main

    return main(["regress", *map(str, argv)])


def _edit_episodes(run: Path, which=slice(None), drop=(), **columns) -> None:
    """Rewrite episode files of `run` (all, or the sorted slice `which`) as a foreign or broken writer would."""
    for path in sorted((run / "episodes").glob("*.parquet"))[which]:
        table = pd.read_parquet(path).drop(columns=list(drop))
        for column, value in columns.items():
            table[column] = value
        table.to_parquet(path)


@pytest.mark.parametrize("failed_side", ["both", "candidate"])
def test_a_side_whose_episodes_all_failed_is_exit_2_not_a_verdict(tmp_path, capsys, failed_side):
    scores = {e: 50.0 + i for i, e in enumerate(episodes(2))}
    base, cand = make_run(tmp_path / "base", "expert", scores), make_run(tmp_path / "cand", "llm", scores)
    for run in ((base, cand) if failed_side == "both" else (cand,)):
        _edit_episodes(run, status="failed", error="Traceback ...\nRuntimeError: boom", failure="agent")
    named = base if failed_side == "both" else cand
    with pytest.raises(RegressInputError, match="all 8 paired episodes failed"):
        regress(base, cand)
    assert _cli(base, cand) == 2
    err = capsys.readouterr().err
    assert "all 8 paired episodes failed" in err and str(named) in err
    assert ("agent expert" if failed_side == "both" else "agent llm") in err
    # One scored episode on each side is enough to compare (a failed episode keeps its score).
    _edit_episodes(cand, which=slice(0, 1), status="finished", error="", failure="")
    if failed_side == "both":
        _edit_episodes(base, which=slice(0, 1), status="finished", error="", failure="")
    assert _cli(base, cand) == 0


@pytest.mark.parametrize("side, column, label", [
    ("candidate", "driving_score", "driving score"),
    ("baseline", "driving_score", "driving score"),
    ("candidate", "km_driven", "collisions/km"),
    ("candidate", "collisions", "collisions/km"),
])
def test_a_nan_metric_is_exit_2_naming_run_agent_and_metric(tmp_path, capsys, side, column, label):
    scores = {e: 70.0 for e in episodes(2)}
    runs = {"baseline": make_run(tmp_path / "base", "expert", scores),
            "candidate": make_run(tmp_path / "cand", "llm-owl", scores)}
    _edit_episodes(runs[side], which=slice(1, 2), **{column: np.nan})
    assert _cli(runs["baseline"], runs["candidate"]) == 2
    err = capsys.readouterr().err
    assert f"{side} run {runs[side]}" in err and label in err and column in err
    assert ("agent expert" if side == "baseline" else "agent llm-owl") in err
    with pytest.raises(RegressInputError, match=label):
        regress(runs["baseline"], runs["candidate"])


def test_a_missing_metric_column_is_exit_2(tmp_path, capsys):
    scores = {e: 70.0 for e in episodes(2)}
    base, cand = make_run(tmp_path / "base", "expert", scores), make_run(tmp_path / "cand", "expert", scores)
    _edit_episodes(cand, drop=["driving_score"])
    assert _cli(base, cand) == 2
    err = capsys.readouterr().err
    assert f"candidate run {cand}" in err and "driving_score" in err and "driving score" in err
    # The same for tables handed to `compare` directly.
    table = _table("expert", scores)
    with pytest.raises(RegressInputError, match="baseline run baseline .*: driving score is NaN"):
        compare(table.assign(driving_score=np.nan), table)


@pytest.mark.parametrize("broken", ["episode", "consolidated", "manifest"])
def test_an_unreadable_run_file_is_exit_2_naming_the_file(tmp_path, capsys, broken):
    from prunedrive.app.cli import main

    scores = {e: 70.0 for e in episodes(2)}
    base, cand = make_run(tmp_path / "base", "expert", scores), make_run(tmp_path / "cand", "expert", scores)
    if broken == "episode":
        target = sorted((cand / "episodes").glob("*.parquet"))[2]
    elif broken == "consolidated":  # a finished run: only episodes.parquet is left
        RunDir(cand).consolidate()
        for path in (cand / "episodes").glob("*.parquet"):
            path.unlink()
        target = cand / "episodes.parquet"
    else:
        target = cand / "manifest.json"
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # torn by a crash or a full disk
    assert _cli(base, cand) == 2
    assert str(target) in capsys.readouterr().err
    assert main(["regress", str(base), str(cand)]) == 2
    assert str(target) in capsys.readouterr().err
    with pytest.raises(RegressInputError, match=str(target)):  # the pytest helper: an input error, not a verdict
        assert_no_regression(base, cand)


def _suite_run(path: Path, suite_file: Path, scores, *, agent="expert", with_identity=True) -> Path:
    from prunedrive.app.run import suite_identity
    from prunedrive.scenarios.loader import load_suite

    suite = load_suite(suite_file)
    RunDir(path).create({"suite": suite.name, "agents": [agent], "model": None}, [],
                        identity=suite_identity(suite) if with_identity else None)
    return make_run(path, agent, scores)


def test_suites_that_share_a_name_but_not_their_content_are_exit_2(tmp_path, tiny_suite, capsys):
    denser = tmp_path / "denser.yaml"
    denser.write_text(tiny_suite.read_text().replace("vehicles: 4", "vehicles: 12"))  # same `name: tiny`
    scores = {("short-cruise", seed): 70.0 + seed for seed in (1, 2, 3)}
    base = _suite_run(tmp_path / "base", tiny_suite, scores)
    other = _suite_run(tmp_path / "other", denser, scores)
    same = _suite_run(tmp_path / "same", tiny_suite, scores)
    assert _cli(base, other) == 2
    err = capsys.readouterr().err
    assert "different suites" in err and str(base) in err and str(other) in err
    hashes = [json.loads((run / "manifest.json").read_text())["identity"]["suite_hash"] for run in (base, other)]
    assert hashes[0] != hashes[1] and all(h in err for h in hashes)
    assert _cli(base, same) == 0
    # A run without identity (older, or imported) is compared by suite name.
    imported = _suite_run(tmp_path / "imported", denser, scores, with_identity=False)
    assert _cli(base, imported) == 0
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(tiny_suite.read_text().replace("name: tiny", "name: other"))
    assert _cli(base, _suite_run(tmp_path / "renamed", renamed, scores, with_identity=False)) == 2
    assert "different suites" in capsys.readouterr().err
