"""The reaper: what a run started dies with it, even when the run is killed with -9."""
import os
import signal
import subprocess
import sys
import time

import pytest

from pathlib import Path

from prunedrive.harness.reaper import _stat, descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc (Linux)")

DRIVER = """
import subprocess, sys, time
from prunedrive.harness.reaper import start_reaper
start_reaper()
# A grandchild that, like Ray's DashboardAgent, outlives its parent and is re-parented to init.
subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                  "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                  "import time; time.sleep(120)"])
print("ready", flush=True)
time.sleep(120)
"""


def _alive(pid, started):
    info = _stat(pid)
    return info is not None and info[1] == started


def test_a_killed_driver_leaves_no_process_behind():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    assert driver.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # the reaper has listed the tree
    tree = descendants(driver.pid)
    assert len(tree) >= 3  # the reaper, the child, the grandchild
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p, s) for p, s in tree.items()):
        time.sleep(0.2)
    assert not [p for p, s in tree.items() if _alive(p, s)]


@pytest.mark.ray
def test_a_run_on_ray_killed_with_9_leaves_no_ray_process(tiny_suite, tmp_path):
    pytest.importorskip("ray")
    run = subprocess.Popen([sys.executable, "-m", "prunedrive.app.cli", "run", "--suite", str(tiny_suite),
                            "--agent", "expert", "--workers", "2", "--out", str(tmp_path), "--run-id", "r", "--quiet"],
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, tree = time.time() + 120, {}
    while time.time() < deadline:  # until Ray's agents are up (the raylet's children)
        tree = descendants(run.pid)
        names = [Path(f"/proc/{p}/cmdline").read_bytes() for p in tree if _stat(p)]
        if any(b"DashboardAgent" in n or b"RuntimeEnvAgent" in n or b"raylet" in n for n in names) and len(tree) > 5:
            break
        time.sleep(0.5)
    time.sleep(2)
    tree = descendants(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p, s) for p, s in tree.items()):
        time.sleep(0.5)
    assert not [p for p, s in tree.items() if _alive(p, s)]
