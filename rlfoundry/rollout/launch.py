"""`rlfoundry serve`: one engine server, or N of them behind sglang-router.

With `--engines N` the engines run as child processes on ports after P and the real
`sglang-router` (PyPI) listens on P; Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[:4]}... exited with code {p.returncode} before {url} came up")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")


def build_engine_app(model_path: str, max_batch: int, max_len: int | None, dtype: str, name: str | None,
                     speculative_steps: int = 0):
    import torch

    from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer
    from rlfoundry.model import load_pretrained
    from rlfoundry.rollout.engine import Engine
    from rlfoundry.rollout.server import create_app

    model = load_pretrained(model_path, dtype=getattr(torch, dtype))
    tokenizer = load_tokenizer(model_path)
    eos = eos_token_ids(tokenizer) if tokenizer is not None else None
    engine = Engine(model, max_batch=max_batch, max_len=max_len, eos_token_ids=eos, speculative_steps=speculative_steps)
    return create_app(engine, tokenizer, model_path=str(model_path), served_model_name=name)


def serve(model: str, host: str = "127.0.0.1", port: int = 30000, engines: int = 1, max_batch: int = 64,
          max_len: int | None = None, dtype: str = "float32", served_model_name: str | None = None,
          log_level: str = "warning", speculative_steps: int = 0) -> int:
    """Serve `model`; with engines > 1, behind sglang-router. Returns the exit code."""
    if not (Path(model) / "config.json").exists():
        print(f"error: --model {model}: no config.json there", file=sys.stderr)
        return 2
    if engines == 1:
        import uvicorn

        app = build_engine_app(model, max_batch, max_len, dtype, served_model_name, speculative_steps)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return 0

    children: list[subprocess.Popen] = []

    def stop(*_):
        for p in children:
            if p.poll() is None:
                p.terminate()
        for p in children:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def start_engine(p_port: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "rlfoundry.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(p_port), "--max-batch", str(max_batch), "--dtype", dtype, "--log-level", "error"]
        if max_len:
            cmd += ["--max-len", str(max_len)]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        if speculative_steps:
            cmd += ["--speculative-steps", str(speculative_steps)]
        return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(0)))
    try:
        ports = [free_port() for _ in range(engines)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        children.extend(start_engine(p) for p in ports)
        for url in urls:
            wait_healthy(url + "/health", 300, children)
        router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", host,
                                   "--port", str(port), "--worker-urls", *urls, "--policy", "round_robin",
                                   "--log-level", "warn"])
        children.append(router)
        wait_healthy(f"http://127.0.0.1:{port}/health", 120, children)
        for url, p in zip(urls, children):
            print(f"engine pid={p.pid} url={url}", flush=True)
        print(f"sglang-router on {host}:{port} -> {' '.join(urls)}", flush=True)
        restarts = 0
        while router.poll() is None:
            time.sleep(0.5)
            for i, p in enumerate(children[:engines]):
                if p.poll() is not None and restarts < 10 * engines:
                    # the router stops sending it work after failed health checks; bring it back on
                    # the same URL and the router takes it again once it answers
                    print(f"engine {urls[i]} exited with code {p.returncode}; restarting it", file=sys.stderr, flush=True)
                    children[i] = start_engine(ports[i])
                    restarts += 1
        print(f"error: sglang-router exited with code {router.returncode}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
