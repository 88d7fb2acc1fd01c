"""prunedrive: closed-loop evaluation of pruned driving LLMs.

The package maps the project's top-level folders into one namespace (see pyproject.toml):

    prunedrive.scenarios   suites and their loader                      (bottom layer)
    prunedrive.harness     env, backends, criteria, scoring, runner, results, summary, regress, report
    prunedrive.models      the driving LLM, tokenizer, text format, pruning, sparse execution
    prunedrive.agents      the expert, baselines, the LLM agent, the agent registry
    prunedrive.app         the CLI and the pipelines that drive agents (data, training, bench, compression)

Importing it registers the Gymnasium env `prunedrive/Drive-v0` (by name only: nothing heavy is imported):

    import gymnasium as gym, prunedrive
    env = gym.make("prunedrive/Drive-v0", scenario="smoke/roundabout")
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("prunedrive")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"


def _register_env() -> None:
    import gymnasium as gym

    if "prunedrive/Drive-v0" not in gym.registry:
        gym.register(id="prunedrive/Drive-v0", entry_point="prunedrive.harness.env:make_drive_env")


_register_env()
