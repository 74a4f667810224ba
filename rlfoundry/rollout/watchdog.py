"""Run a command for as long as a given process lives:

    python -m rlfoundry.rollout.watchdog PARENT_PID -- command args...

The command runs as a child; when PARENT_PID is gone (killed in any way, SIGKILL included) the
child is terminated (then killed after 5 s) and the watchdog exits. SIGTERM/SIGINT to the watchdog
stop the child the same way, and the child is SIGKILLed by the kernel if the watchdog itself is
killed (PR_SET_PDEATHSIG). The RL loop starts its engine servers and sglang-router through it, so
that nothing outlives a killed run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_watchdog() -> None:
    """In the child: the kernel sends it SIGKILL if the watchdog itself is killed (Ray, for one,
    SIGKILLs the direct children of a worker that exits). Safe here: the watchdog is one thread."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m rlfoundry.rollout.watchdog PARENT_PID -- command args...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[2:], preexec_fn=_die_with_watchdog)

    def stop(*_):
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
        sys.exit(child.wait())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while child.poll() is None:
        if not _alive(parent) or os.getppid() == 1 and parent != 1:
            stop()
        time.sleep(0.5)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
