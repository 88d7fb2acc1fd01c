"""No process outlives the run that started it, even a run killed with -9.

Ray's local cluster leaves its DashboardAgent and RuntimeEnvAgent running when the driver is killed
(they are children of the raylet, which exits, and are re-parented to init). A run that starts Ray
therefore starts this reaper first: a small process in its own session that watches the driver. It
keeps a list of the driver's descendants (re-read twice a second, each with its start time, so a reused
pid is never mistaken for ours), and the driver puts a token in its environment, which everything it
starts inherits (Ray's processes included). Once the driver is gone, the reaper kills every listed
process still alive and every process that carries the token, so one started between two looks is not
missed. A run that ends normally stops Ray itself and then stops the reaper.

    python -m prunedrive.harness.reaper DRIVER_PID
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
TOKEN_VARIABLE = "PRUNEDRIVE_REAPER_TOKEN"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live, non-zombie process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info:
                children.setdefault(info[0], []).append(int(entry))
                starts[int(entry)] = info[1]
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = starts[child]
                stack.append(child)
    return found


def carrying(token: str) -> dict[int, int]:
    """{pid: start time} of the live processes whose environment holds our token."""
    marker = f"{TOKEN_VARIABLE}={token}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environment = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        info = _stat(int(entry))
        if info is not None and marker in environment.split(b"\0"):
            found[int(entry)] = info[1]
    return found


def watch(driver: int, token: str) -> None:
    own = os.getpid()
    known: dict[int, int] = {}
    while _stat(driver) is not None:
        known.update(descendants(driver))
        time.sleep(POLL_S)
    known.update(carrying(token))
    for pid, started in known.items():
        info = _stat(pid)
        if pid != own and info is not None and info[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start_reaper() -> subprocess.Popen | None:
    """Watch this process (Linux: it reads /proc); None elsewhere. Call it before starting what it guards."""
    if not sys.platform.startswith("linux"):
        return None
    token = secrets.token_hex(8)
    reaper = subprocess.Popen([sys.executable, "-m", "prunedrive.harness.reaper", str(os.getpid()), token],
                              start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.environ[TOKEN_VARIABLE] = token  # after the reaper started: it must not find itself
    return reaper


def stop_reaper(reaper: subprocess.Popen | None) -> None:
    os.environ.pop(TOKEN_VARIABLE, None)
    if reaper is not None and reaper.poll() is None:
        reaper.kill()
        reaper.wait()


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
