"""Running model-written code in a sandboxed subprocess.

The child is `python -I` (isolated: no user site, no PYTHON* variables) in a fresh private temporary
directory (removed after), with an empty environment, CPU-time and address-space limits
(RLIMIT_CPU, RLIMIT_AS), no core files, its own session (the whole process group is killed on
timeout), no network (a new network namespace when the kernel allows it; in any case an audit hook
that refuses sockets and new processes before the untrusted code runs), and a wall-clock timeout.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile

CODE_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)

_GUARD = r'''
import sys
def _guard(event, args):
    if event.startswith(("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork",
                         "os.spawn", "pty.")):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
del _guard
src = open(sys.argv[1]).read()
exec(compile(src, "solution.py", "exec"), {"__name__": "__main__"})
'''

CLONE_NEWNET = 0x40000000


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:  # a private network namespace (needs CAP_SYS_ADMIN; the audit hook covers the rest)
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
        except OSError:
            pass
    return apply


def run_sandboxed(source: str, timeout_s: float = 10.0, memory_mb: int = 512, stdin: str = "") -> subprocess.CompletedProcess:
    """Run Python `source` in the sandbox; returns the completed process (returncode -9 on timeout)."""
    with tempfile.TemporaryDirectory(prefix="rlfoundry-sandbox-") as tmp:
        path = os.path.join(tmp, "solution.py")
        with open(path, "w") as f:
            f.write(source)
        proc = subprocess.Popen([sys.executable, "-I", "-c", _GUARD, path], cwd=tmp, env={"PATH": "/usr/bin:/bin"},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_limits(max(1, int(timeout_s) + 1), memory_mb))
        try:
            out, err = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, -9, out, err + "\nsandbox: timed out")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def extract_code(response: str) -> str | None:
    """The last ```python fenced block of a response."""
    blocks = CODE_RE.findall(response)
    return blocks[-1] if blocks else None


def run_code_tests(response: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 512) -> bool:
    """Whether the response's code followed by `tests` (e.g. assert statements) exits with status 0."""
    code = extract_code(response)
    if code is None:
        return False
    return run_sandboxed(code + "\n\n" + tests + "\n", timeout_s, memory_mb).returncode == 0
