"""prunedrive: closed-loop evaluation of pruned driving LLMs.

The package maps the project's top-level folders into one namespace (see pyproject.toml):

    prunedrive.plugins     the one Registry behind every extension point         (bottom layer)
    prunedrive.scenarios   suites and their loader
    prunedrive.harness     env, backends, criteria, scoring, the episode state machine, results, metrics, regress
    prunedrive.models      the driving LLM, tokenizer, text format, model card, pruning, compressed checkpoints
    prunedrive.agents      the expert, baselines, the LLM agents, the agent registry
    prunedrive.report      reports over run directories (attachments placed by the renderers they name)
    prunedrive.app         the CLI and one module per command (run, bench, claims, prune, latency-sweep, ...)
    prunedrive.benchmarks  speed figures as ratios measured in one run                    (top layer)

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
