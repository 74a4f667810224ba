"""Run a command for as long as a given process lives:

    python -m rlfoundry.rollout.watchdog PARENT_PID -- command args...

The command runs as a child; when PARENT_PID is gone (killed in any way, SIGKILL included) the
child is terminated (then killed after 5 s) and the watchdog exits. SIGTERM/SIGINT to the watchdog
stop the child the same way. The RL loop starts its engine servers and sglang-router through it, so
that nothing outlives a killed run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m rlfoundry.rollout.watchdog PARENT_PID -- command args...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[2:])

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
