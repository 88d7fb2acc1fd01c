"""Scenario suites (YAML files in this folder) and their loader."""
from prunedrive.scenarios.loader import Scenario, ScenarioError, Suite, load_suite, suite_path

__all__ = ["Scenario", "ScenarioError", "Suite", "load_suite", "suite_path"]
