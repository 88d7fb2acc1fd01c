"""`prunedrive same-episodes`: two runs of the same episodes are identical except the machine's timings; a
different agent, or a single changed value, is found and named."""
import pandas as pd

from prunedrive.app.cli import main


def _run(suite, out, run_id, *agents):
    assert main(["run", "--suite", str(suite), "--agent", *agents, "--seeds", "1", "2", "--out", str(out),
                 "--run-id", run_id, "--quiet"]) == 0
    return out / run_id


def test_two_runs_of_the_same_episodes_are_identical_and_a_change_is_named(tiny_suite, tmp_path, capsys):
    a = _run(tiny_suite, tmp_path, "a", "expert", "constant")
    b = _run(tiny_suite, tmp_path, "b", "expert", "constant")
    capsys.readouterr()
    assert main(["same-episodes", str(a), str(b)]) == 0  # wall times differ; nothing else does
    assert capsys.readouterr().out.count("identical") == 2
    # One agent of each run, under another name: the expert against the constant agent differs in its driving.
    assert main(["same-episodes", str(a), str(b), "--agent-a", "expert", "--agent-b", "constant"]) == 1
    out = capsys.readouterr().out
    assert "episodes: 2 vs 2 rows" in out and "DIFFERENT" in out and "driving_score" in out
    assert "rows or keys differ" in out  # their episodes last different numbers of steps
    # A single value changed in one steps file is found, with its episode.
    steps = pd.read_parquet(b / "steps.parquet")
    steps.loc[5, "steer"] += 1e-9
    steps.to_parquet(b / "steps.parquet", index=False)
    assert main(["same-episodes", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "episodes: 4 vs 4 rows" in out and "differing columns: steer" in out and "first differing rows:" in out


def test_bad_input_is_exit_2_naming_it(tiny_suite, tmp_path, capsys):
    a = _run(tiny_suite, tmp_path, "a", "expert")
    assert main(["same-episodes", str(a), str(a), "--agent-a", "expert"]) == 2
    assert "--agent-a and --agent-b go together" in capsys.readouterr().err
    assert main(["same-episodes", str(a), str(a), "--agent-a", "expert", "--agent-b", "nobody"]) == 2
    assert "no agent 'nobody'; it has: expert" in capsys.readouterr().err
    assert main(["same-episodes", str(a), str(tmp_path / "missing")]) == 2
