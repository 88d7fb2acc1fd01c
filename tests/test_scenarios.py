"""Suite loading and its error messages."""
import pytest

from prunedrive.scenarios.loader import ScenarioError, load_suite


def write(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


BASE = "name: t\nscenarios:\n  - name: a\n    kind: highway_cruise\n"


@pytest.mark.parametrize("suite", ["smoke", "standard"])
def test_shipped_suites_load(suite):
    loaded = load_suite(suite)
    assert loaded.episodes()
    kinds = {s.kind for s in loaded.scenarios}
    assert {"highway_cruise", "dense_highway", "onramp_merge", "roundabout", "intersection"} <= kinds


def test_standard_suite_has_tens_of_episodes_over_several_seeds():
    suite = load_suite("standard")
    assert len(suite.episodes()) >= 20
    assert all(len(s.seeds) >= 3 for s in suite.scenarios)


@pytest.mark.parametrize("extra, message", [
    ("    lanse: 3\n", r"scenarios\[0\] \('a'\): unknown field 'lanse'; allowed: .*lanes"),
    ("    lanes: three\n", r"field 'lanes' must be an integer in \[1, 8\], got 'three'"),
    ("    lanes: 12\n", r"field 'lanes' is 12; allowed range \[1, 8\]"),
    ("    seeds: [1, 1]\n", r"field 'seeds' repeats a seed"),
    ("    seeds: [-1]\n", r"field 'seeds' must be an integer in \[0, 2\*\*32\)"),
    ("    speed_limit_mps: true\n", r"field 'speed_limit_mps' must be a number"),
])
def test_bad_fields_name_file_scenario_field_and_allowed_values(tmp_path, extra, message):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ScenarioError, match=message) as info:
        load_suite(path)
    assert str(path) in str(info.value)


def test_bad_kind_lists_the_kinds(tmp_path):
    from prunedrive.harness.backends import check_suite

    path = write(tmp_path, "name: t\nscenarios:\n  - name: a\n    kind: parking\n")
    suite = load_suite(path)  # the loader checks structure; the backends say which kinds exist
    with pytest.raises(ScenarioError, match=r"suite\.yaml: scenarios\[0\] \('a'\): field 'kind' is 'parking'; "
                                            "allowed: highway_cruise, dense_highway.*carla_route"):
        check_suite(suite)


def test_structure_errors(tmp_path):
    with pytest.raises(ScenarioError, match="'scenarios' must be a non-empty list"):
        load_suite(write(tmp_path, "name: t\nscenarios: []\n"))
    with pytest.raises(ScenarioError, match="missing required field 'kind'"):
        load_suite(write(tmp_path, "name: t\nscenarios:\n  - name: a\n"))
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_suite(write(tmp_path, "name: [t\n"))
    with pytest.raises(ScenarioError, match="unknown top-level field 'scenario'"):
        load_suite(write(tmp_path, "name: t\nscenario: []\n"))
    with pytest.raises(ScenarioError, match="repeated: 'a' and 'a'"):
        load_suite(write(tmp_path, BASE + "  - name: a\n    kind: roundabout\n"))


def test_unknown_suite_name_lists_known_ones():
    with pytest.raises(ScenarioError, match="unknown suite 'smok'; known suites: .*smoke"):
        load_suite("smok")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\nscenarios: []\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_suite(path)
