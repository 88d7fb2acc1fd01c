"""pytest plugin (entry point `pytest11: prunedrive = harness.pytest_plugin`): a regression gate in tests.

    def test_pruned_model_holds_up(assert_no_regression):
        assert_no_regression("results/dense", "results/owl-50", max_drop=5)

or, without the fixture, `from prunedrive.harness.regress import assert_no_regression`. It raises
AssertionError (with the verdict table) on a significant regression, and RegressInputError (a ValueError)
when the runs cannot be compared: what `prunedrive regress` exits 2 on (unreadable or missing files,
different suites, no scored common episodes, a NaN or missing metric); see `harness.regress` for the rule.

Loaded into every pytest session of an environment where prunedrive is installed, so it imports
nothing heavy until used.
"""
from __future__ import annotations

import pytest


def assert_no_regression(baseline, candidate, max_drop: float = 5.0, **options):
    from prunedrive.harness.regress import assert_no_regression as check

    return check(baseline, candidate, max_drop=max_drop, **options)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "ray: starts a local Ray (distributed runner tests)")


@pytest.fixture(name="assert_no_regression")
def assert_no_regression_fixture():
    """The regression gate as a fixture: `assert_no_regression(baseline_dir, candidate_dir, max_drop=5)`."""
    return assert_no_regression
