"""Progress a person can follow in a terminal and in a log file.

In a terminal, rich bars (`live_bars`). Piped into a log (`prunedrive bench 2>&1 | tee log`), a rich bar prints
nothing useful, so every long loop also has a `Ticker`: a plain line (done/total, elapsed, ETA) at most every
PLAIN_EVERY_S seconds and at the end. `Heartbeat` guarantees a line at least every HEARTBEAT_S seconds through a
whole job, whatever phase it is in, and `estimate` says how long a phase will take before it starts.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

PLAIN_EVERY_S = 30.0  # a plain progress line at most this often
HEARTBEAT_S = 60.0    # and, under a Heartbeat, at least this often

_last_line = [time.monotonic()]  # when the last progress line was printed (read by Heartbeat)


def live_bars(enabled: bool = True) -> bool:
    if not enabled:
        return False
    from rich.console import Console

    return Console().is_terminal


def plain_lines(enabled: bool = True) -> bool:
    """Plain periodic lines instead of a bar: progress is wanted and the output is not a terminal."""
    return enabled and not live_bars(enabled)


def say(text: str, stream=None) -> None:
    """Print one progress line now (flushed: a log shows it as it comes) and note the time for Heartbeat.
    `stream`: where it goes (default stdout)."""
    print(text, file=stream, flush=True)
    _last_line[0] = time.monotonic()


def duration(seconds: float) -> str:
    """A duration for people: "40 s", "3.5 min", "1.2 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPU cores)."""
    return os.getloadavg()[0], os.cpu_count() or 1


def estimate(idle_seconds: float) -> str:
    """How long a phase measured at `idle_seconds` on an idle machine will take now: with the current load when
    the machine is busier than its cores (a loaded 2-core machine runs CPU-bound work proportionally slower)."""
    load, cores = machine_load()
    text = f"about {duration(idle_seconds)} on an idle machine"
    if load > cores:
        text += f"; load is {load:.1f} on {cores} cores now, so expect ~{duration(idle_seconds * load / cores)}"
    return text


class Ticker:
    """Plain progress lines of one long loop when the output is not a terminal:
    `<label>: <done>/<total> <unit>, elapsed <t>, ETA <t>[, <note>]`, at most every `every_s` seconds and at the
    end. `eta_bound`: the total is only an upper bound (e.g. epochs with early stopping), so the ETA is one too.
    `stream`: where the lines go (default stdout; a command whose stdout is its result passes sys.stderr)."""

    def __init__(self, label: str, total: int, unit: str = "", enabled: bool = True, every_s: float = PLAIN_EVERY_S,
                 done: int = 0, eta_bound: bool = False, stream=None):
        self.label, self.total, self.unit, self.every_s, self.eta_bound = label, total, unit, every_s, eta_bound
        self.stream = stream
        self.enabled = plain_lines(enabled)
        self.started = self.last = time.monotonic()
        self.first_done = done  # resumed work does not count towards the rate

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not (force or done >= self.total or now - self.last >= self.every_s):
            return
        self.last = now
        say(self.line(done, now - self.started, note), self.stream)

    def finish(self, what: str) -> None:
        """The closing line: `<label>: done, <what> in <elapsed>`."""
        if self.enabled:
            say(f"  {self.label}: done, {what} in {duration(time.monotonic() - self.started)}", self.stream)

    def line(self, done: int, elapsed: float, note: str = "") -> str:
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        left = max(self.total - done, 0)
        eta = "0 s" if left == 0 else duration(left / rate) if rate > 0 else "?"
        unit = f" {self.unit}" if self.unit else ""
        return (f"  {self.label}: {done}/{self.total}{unit}, elapsed {duration(elapsed)}, "
                f"ETA {'at most ' if self.eta_bound and left else ''}{eta}" + (f", {note}" if note else ""))


class Heartbeat:
    """A line at least every `every_s` seconds while a long job runs with its output going to a log: when no
    progress line came for that long, `still <phase> (<elapsed in it>)`. `phase` is set by the job as it goes.
    Off in a terminal (the bars move there) and when disabled."""

    def __init__(self, enabled: bool = True, every_s: float = HEARTBEAT_S, prefix=lambda: ""):
        self.enabled, self.every_s, self.prefix = plain_lines(enabled), every_s, prefix
        self.phase, self.phase_started = "starting", time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def set_phase(self, phase: str) -> None:
        self.phase, self.phase_started = phase, time.monotonic()

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(min(5.0, self.every_s / 4)):
            if time.monotonic() - _last_line[0] >= self.every_s:
                say(f"{self.prefix()}still {self.phase} "
                    f"({duration(time.monotonic() - self.phase_started)} in this phase)")

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class EpisodeProgress:
    """A run's episodes (harness.runner.run_suite), as a person can follow them: a rich bar (with ETA and the
    running mean driving score) in a terminal; a Ticker's plain lines when the output goes to a log."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.scores = enabled, total, []
        self.ticker = Ticker("episodes", total, "scored")
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            if Console().is_terminal:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[score]}"))
                self.bar.start()
                self.task = self.bar.add_task("episodes", total=self.total, score="")
        return self

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, row: dict) -> None:
        self.scores.append(row["driving_score"])
        if self.bar is not None:
            self.bar.update(self.task, advance=1, score=f"mean DS {np.mean(self.scores):.1f}")
        elif self.enabled:
            self.ticker.update(len(self.scores), f"mean DS {np.mean(self.scores):.1f}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
