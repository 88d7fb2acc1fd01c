"""The command line's option types and the options several commands share: every number finite and in range,
every directory usable, before anything runs (argparse then exits 2 naming the option and what it allows)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def threads(value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: a positive integer or 'auto'")


def at_least(minimum: int, maximum: int | None = None):
    """argparse type: an integer >= minimum (and <= maximum, where one is given)."""
    allowed = f"allowed: {minimum}..{maximum}" if maximum is not None else f"allowed: at least {minimum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer; {allowed}") from None
        if number < minimum or (maximum is not None and number > maximum):
            raise argparse.ArgumentTypeError(f"{number} is out of range; {allowed}")
        return number
    return parse


def finite(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in the interval from low to high (either end open where asked): NaN
    compares False with everything, so an unchecked one silently turns every limit or gate off."""
    allowed = (f"allowed: a finite number {'>' if low_open else '>='} {low:g}" if high == math.inf else
               f"allowed: a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number; {allowed}") from None
        below = number <= low if low_open else number < low
        above = number >= high if high_open else number > high
        if not math.isfinite(number) or below or above:
            raise argparse.ArgumentTypeError(f"{value} is out of range; {allowed}")
        return number
    return parse


def out_dir(value: str) -> str:
    """argparse type: --out is a directory, or can be made one (nothing is created here: a refused run leaves
    no trace)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: not a directory (it is a file); give a directory for results")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {existing} is not a directory, so {value} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value}: {existing} is not writable")
    return value


# Upper bounds: past them an option is a typo or an attack (memory, back-off sleeps), not a plan.
MAX_BATCH, MAX_WORKERS, MAX_RETRIES, MAX_N_BOOT = 4096, 1024, 10, 1_000_000
MAX_TIMEOUT_S = 1e6  # about 11 days
TIMEOUT_RANGE = f"Seconds, 0 < S <= {MAX_TIMEOUT_S:g}: there is no 'no limit' (0 is refused); give a large S instead"


def add_mlflow_option(parser: argparse.ArgumentParser) -> None:
    # const "" (a bare --mlflow) stands for the default store, which depends on the run's output folder.
    parser.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                        help="log the finished run to MLflow, one MLflow run per agent; default store "
                             "sqlite:///<out>/mlflow.db (needs the mlflow extra)")


def add_batch_option(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    parser.add_argument("--batch", type=at_least(1, MAX_BATCH), metavar="K",
                        help="run K episodes side by side per worker, an LLM agent deciding all their steps in one "
                             f"batched decode (1..{MAX_BATCH}; default 1"
                             + ("; a resume defaults to the run's own" if resumable else "")
                             + "). Results do not depend on K except where batched float arithmetic changes an "
                             "LLM's greedy token (benchmarks/throughput.py measures how often); a given K is "
                             "deterministic")


def add_latency_option(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    from prunedrive.harness.latency import LATENCY_FORMS

    parser.add_argument("--latency", metavar="MODEL",
                        help=f"latency in the loop (harness.latency): {LATENCY_FORMS}. Default none: the world "
                             "waits for the agent, as every closed-loop benchmark does. Part of the run's identity"
                             + ("; a resume defaults to the run's own" if resumable else ""))


def device_name(value: str) -> str:
    """argparse type: the spelling of --device (models.device.parse_device); whether it exists is checked later."""
    from prunedrive.models.device import parse_device

    try:
        return parse_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


def add_precision_options(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    from prunedrive.models.device import DTYPES

    parser.add_argument("--device", type=device_name, default=None if resumable else "cpu",
                        help="where models run: cpu, cuda or cuda:N (default cpu"
                             + ("; a resume: the run's own" if resumable else "")
                             + "); refused where that device is absent")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None if resumable else "float32",
                        help="the models' precision (default float32" + ("; a resume: the run's own" if resumable else "")
                             + "); float16 only on a GPU (refused on the CPU: its half matmuls are slow or missing)")
