"""math-verify with a timeout that works from any thread.

math-verify's own timeouts use SIGALRM, which only works in the main thread. Here its timeouts are
off and the check runs in a worker process (whose main thread it is) instead; a check that overruns
`timeout_s` gets its worker killed and scores 0, and the pool is rebuilt.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import multiprocessing as mp
import threading

_pool: cf.ProcessPoolExecutor | None = None
_lock = threading.Lock()


def _verify(response: str, label: str) -> float:
    from math_verify import parse, verify

    gold = parse(label if "$" in label or "\\" in label else f"${label}$", parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None))


def _get_pool() -> cf.ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"))
        return _pool


def _reset_pool(broken: cf.ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is broken:
            for p in list(getattr(broken, "_processes", {}).values()):
                p.kill()
            broken.shutdown(wait=False, cancel_futures=True)
            _pool = None


@atexit.register
def close_pool() -> None:
    """Stop the worker processes (the next check starts new ones)."""
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None


def math_verify_score(response: str, label: str, timeout_s: float = 10.0) -> float:
    """1.0 when math-verify finds the response's answer equal to `label`, else 0.0 (also on timeout)."""
    pool = _get_pool()
    try:
        return pool.submit(_verify, response, label).result(timeout=timeout_s)
    except cf.TimeoutError:
        _reset_pool(pool)
        return 0.0
    except cf.process.BrokenProcessPool:
        _reset_pool(pool)
        return 0.0
