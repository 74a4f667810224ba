"""The watchdog that ties engine and router processes to the actor that started them."""

import os
import signal
import subprocess
import sys
import time


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":  # a zombie has exited
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


def _start(parent_pid: int) -> tuple[subprocess.Popen, int]:
    dog = subprocess.Popen([sys.executable, "-m", "rlfoundry.rollout.watchdog", str(parent_pid), "--",
                            sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(600)"],
                           stdout=subprocess.PIPE, text=True)
    return dog, int(dog.stdout.readline())


def test_child_stops_when_the_watched_parent_dies():
    parent = subprocess.Popen(["sleep", "600"])
    dog, child = _start(parent.pid)
    parent.kill()
    parent.wait()
    assert _gone(child) and dog.wait(10) is not None


def test_child_dies_when_the_watchdog_is_sigkilled():
    dog, child = _start(os.getpid())
    os.kill(dog.pid, signal.SIGKILL)
    dog.wait()
    assert _gone(child)
