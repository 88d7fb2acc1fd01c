"""The reaper: what a run started dies with it, even when the run is killed with -9."""
import os
import signal
import subprocess
import sys
import time

import pytest

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
