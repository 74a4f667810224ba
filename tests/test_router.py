"""`rlfoundry serve --engines 2`: two engine servers behind the real sglang-router."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request


from rlfoundry.rollout.client import _get
from rlfoundry.rollout.launch import free_port, wait_healthy


def _up(url):
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def test_openai_client_through_sglang_router(tiny_checkpoint, tmp_path):
    import openai

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "rlfoundry.cli", "serve", "--model", str(tiny_checkpoint),
                             "--engines", "2", "--port", str(port), "--served-model-name", "tiny", "--max-len", "128"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", 180, [proc])
        deadline = time.time() + 30
        while "sglang-router on" not in (tmp_path / "serve.log").read_text() and time.time() < deadline:
            time.sleep(0.2)
        engines = re.findall(r"engine pid=(\d+) url=(\S+)", (tmp_path / "serve.log").read_text())
        assert len(engines) == 2
        for _, url in engines:  # the cores shared out between the two engines
            assert _get(url + "/get_server_info", 10)["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(4):  # round robin: both engines answer
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2 + 2 ="}],
                                               max_tokens=4, temperature=0)
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
        r = client.completions.create(model="tiny", prompt="1 + 1 =", max_tokens=3)
        assert r.usage.completion_tokens == 3
        # one engine dies: the router's retries and health checks route around it
        os.kill(int(engines[0][0]), signal.SIGKILL)
        for _ in range(4):
            r = client.completions.create(model="tiny", prompt="3 + 4 =", max_tokens=2)
            assert r.usage.completion_tokens == 2
        # ... and the launcher brings the dead engine back on its URL
        wait_healthy(engines[0][1] + "/health", 120)
        assert "restarting it" in (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    # SIGTERM stopped the router and every engine
    time.sleep(1)
    assert not _up(f"http://127.0.0.1:{port}/health")
    assert not _up(engines[1][1] + "/health")


def test_one_engine_server_stops_on_sigterm_answering_requests_in_flight(tiny_checkpoint, tmp_path):
    """`rlfoundry serve` (one engine: its loop on the main thread, HTTP in a thread beside it):
    SIGTERM answers the request in flight (here: waiting in a paused engine) with what it has,
    finish_reason abort, and exits at once, rather than leaving the client without an answer."""
    import json
    import threading

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "rlfoundry.cli", "serve", "--model", str(tiny_checkpoint),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    answer = {}

    def long_request():
        body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 20, "ignore_eos": True}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        answer.update(json.load(urllib.request.urlopen(req, timeout=60)))

    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", 180, [proc])
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/pause_generation", data=b"{}",
                                                      headers={"Content-Type": "application/json"}), timeout=10)
        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(1.0)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        client.join(30)
        assert time.time() - t0 < 8
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert answer["output_ids"] == []
    assert not _up(f"http://127.0.0.1:{port}/health")
