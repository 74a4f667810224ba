"""Rewards: task checkers, exact match, math-verify off the main thread with a timeout, the code
sandbox (limits, no network, private directory), a remote reward model, custom and group functions."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rlfoundry.data.tasks import get_task
from rlfoundry.rewards import RewardContext, group_reward, load_reward, score_samples
from rlfoundry.rewards.code import run_code_tests, run_sandboxed
from rlfoundry.rewards.math import close_pool, math_verify_score
from rlfoundry.rl.sample import Sample, Status

CTX = RewardContext(timeout_s=10)


def run(coro):
    return asyncio.run(coro)


def test_task_and_exact_match_rewards():
    task = get_task("countdown")
    p = task.problems(1, 1, seed=3)[0]
    rec = task.rl_record(p)
    s = Sample([1], [2], label=rec["label"], metadata=rec["metadata"] | {"question": p.question},
               text=p.solution)
    assert run(load_reward("task")(CTX, s)) == {"correct": 1.0}
    s.text = "<answer>1+1</answer>"
    assert run(load_reward("task")(CTX, s)) == {"correct": 0.0}
    e = Sample([1], [2], label="42", text="so <answer> 42 </answer>")
    assert run(load_reward("exact_match")(CTX, e)) == {"correct": 1.0}


def test_math_verify_works_off_the_main_thread():
    results = {}

    def check():
        results["eq"] = math_verify_score("The answer is $\\frac{1}{2}$", "0.5", 20)
        results["ne"] = math_verify_score("The answer is $\\frac{1}{3}$", "0.5", 20)

    t = threading.Thread(target=check)
    t.start()
    t.join()
    assert results == {"eq": 1.0, "ne": 0.0}


def test_sandbox_limits():
    assert run_code_tests("```python\ndef f(x):\n    return 2 * x\n```", "assert f(3) == 6")
    assert not run_code_tests("```python\ndef f(x):\n    return 2 * x\n```", "assert f(3) == 7")
    assert not run_code_tests("no code here", "assert True")
    t0 = time.time()
    r = run_sandboxed("while True: pass", timeout_s=1)
    assert r.returncode != 0 and time.time() - t0 < 5
    r = run_sandboxed("x = bytearray(2 * 1024 ** 3)", memory_mb=256)
    assert r.returncode != 0 and "MemoryError" in r.stderr
    r = run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 80))")
    assert r.returncode != 0 and "sandbox" in r.stderr
    r = run_sandboxed("import subprocess\nsubprocess.run(['ls'])")
    assert r.returncode != 0 and "sandbox" in r.stderr
    r = run_sandboxed("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))")
    assert "rlfoundry-sandbox-" in r.stdout and "['solution.py']" in r.stdout


def test_remote_reward_model():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            out = json.dumps({"reward": len(body["response"]) / 10}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ctx = RewardContext(remote_url=f"http://127.0.0.1:{server.server_port}/")
        samples = [Sample([1], [2], text="abcde"), Sample([1], [2], text="<answer>x</answer>")]
        run(score_samples(load_reward("remote"), ctx, samples, format_penalty=-1.0))
        assert samples[0].reward == pytest.approx(0.5 - 1.0) and samples[0].rewards["format"] == -1.0
        assert samples[1].reward == pytest.approx(1.8)
    finally:
        server.shutdown()


async def custom_reward(ctx, sample):
    if sample.text == "boom":
        raise RuntimeError("bad")
    return 1.0 if sample.text == "yes" else 0.0


@group_reward
async def rank_in_group(ctx, samples):
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].text))
    return [float(order.index(i)) for i in range(len(samples))]


def test_custom_group_and_failing_rewards_and_overlong():
    fn = load_reward("test_rewards.custom_reward")
    samples = [Sample([1], [2] * 10, text="yes"), Sample([1], [2] * 19, text="no"), Sample([1], [2], text="boom")]
    run(score_samples(fn, CTX, samples, overlong=(20, 10)))
    assert samples[0].reward == 1.0
    assert samples[1].reward == pytest.approx(-0.9) and samples[1].rewards["overlong"] == pytest.approx(-0.9)
    assert samples[2].status == Status.FAILED and "bad" in samples[2].metadata["reward_error"]
    g = [Sample([1], [2], text="aaa"), Sample([1], [2], text="a")]
    run(score_samples(load_reward("test_rewards:rank_in_group"), CTX, g))
    assert [s.reward for s in g] == [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot load"):
        load_reward("no_such_module.fn")


def test_math_verify_timeout_scores_zero_and_recovers():
    # a limit far below a fresh worker's start-up (a spawned interpreter importing math-verify): the
    # check times out, scores 0, and the pool is rebuilt. The pool is closed first: a warm worker that
    # earlier tests started could answer within the limit.
    close_pool()
    assert math_verify_score("$1/2$", "0.5", timeout_s=0.001) == 0.0
    assert math_verify_score("$1/2$", "0.5", timeout_s=30) == 1.0
