"""Harness time limits around an agent's calls, and os._exit caught inside them: a hung or exiting agent fails
its own episode, never the run."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager, nullcontext

# Generous defaults: a hung agent must not hang the run, a slow 7B model on a CPU must still finish.
STEP_TIMEOUT_S = 300.0      # one reset() or act() of the agent
EPISODE_TIMEOUT_S = 3600.0  # one whole episode, wall time


class AgentTimeout(Exception):
    """The agent ran past a harness time limit: the episode fails (`agent timeout`) and the run goes on."""


@contextmanager
def time_limit(seconds: float | None, what: str):
    """Interrupt the block after `seconds` of wall time with AgentTimeout (SIGALRM: main thread only; elsewhere,
    e.g. in a thread pool, the block runs unlimited and the Ray executor's episode limit is the guard)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise AgentTimeout(f"agent timeout: {what} ran past {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class AgentExit(SystemExit):
    """os._exit() called by an agent inside a guarded call (`exits_raise`): raised instead, so that, like its
    sys.exit(), it fails its own episode, not the run."""


@contextmanager
def exits_raise(what: str):
    """Within the block, os._exit(code) called from this thread of this process raises AgentExit instead of
    ending the process on the spot (no results written, the exit status the agent's, a run's planned
    episodes silently unscored). Another thread's call, or a forked child's, still exits. os._exit is
    restored after the block. Only for agents in the run's own process: a Ray worker leaves it off, so that
    a worker that dies is seen (and its episode re-run) as a dead worker. Code that kept its own reference
    to os._exit (`from os import _exit`) is not caught."""
    real_exit, pid, thread = os._exit, os.getpid(), threading.get_ident()

    def guarded_exit(code: int) -> None:
        if os.getpid() != pid or threading.get_ident() != thread:
            real_exit(code)
        raise AgentExit(f"{what} called os._exit({code})")

    os._exit = guarded_exit
    try:
        yield
    finally:
        os._exit = real_exit


@contextmanager
def agent_call(seconds: float | None, what: str, catch_exit: bool):
    """The guards around one call into an agent: its time limit, and (`catch_exit`) os._exit raising."""
    with time_limit(seconds, what), (exits_raise(what) if catch_exit else nullcontext()):
        yield

