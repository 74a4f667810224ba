"""Weight updates into running engine servers: torch.distributed broadcast (gloo) and from disk,
through the rollout client, with generation in flight."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from rlfoundry.model import Glm4MoeForCausalLM, load_pretrained, save_pretrained, to_hf_state_dict
from rlfoundry.rollout.client import DistributedWeightSender, RolloutError, SGLangClient
from rlfoundry.rollout.launch import free_port, wait_healthy


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    procs, clients = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "rlfoundry.cli", "serve", "--model", str(tiny_checkpoint),
                                       "--port", str(port), "--max-len", "128", "--log-level", "error"],
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        clients.append(SGLangClient(f"http://127.0.0.1:{port}", timeout=120))
    try:
        for c in clients:
            wait_healthy(c.url + "/health", 120, procs)
        yield clients
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)


def _greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - returned for the test to inspect
        return e
    return None


def _assert_logprobs(client, model, prompt):
    """A sampled generation's log-probs are `model`'s log-probs of the same tokens."""
    g = client.generate(prompt, 6, temperature=1.0, seed=3)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + g.output_ids])).logits[0, len(prompt) - 1:-1]
    ref = logits.log_softmax(-1).gather(1, torch.tensor(g.output_ids)[:, None]).flatten()
    assert (ref - torch.tensor(g.logprobs)).abs().max() <= 1e-5
    return g


def test_broadcast_and_disk_updates(servers, tiny_checkpoint, tmp_path):
    base = load_pretrained(tiny_checkpoint)
    trainer = Glm4MoeForCausalLM(base.config)
    trainer.init_weights(seed=1234)  # "trained" weights, different from the servers'
    prompt = [3, 1, 4, 1, 5]
    for c in servers:
        assert c.generate(prompt, 8, temperature=0)[0].output_ids == _greedy(base, prompt, 8)

    sender = DistributedWeightSender(servers, "127.0.0.1", free_port(), backend="gloo")
    # a long generation is in flight on one server while the weights change (EOS ignored: the new
    # weights may well produce it, and this checks that the request survives the update)
    long = {}
    t = threading.Thread(target=lambda: long.update(g=servers[0].generate(prompt, 100, temperature=0,
                                                                          ignore_eos=True)[0]))
    t.start()
    sender.send(to_hf_state_dict(trainer), version="step-1")
    t.join()
    assert len(long["g"].output_ids) == len(long["g"].logprobs) == 100
    for c in servers:
        g = c.generate(prompt, 8, temperature=0)[0]
        assert g.weight_version == "step-1" and g.output_ids == _greedy(trainer, prompt, 8)
    # log-probs after the update are the trainer's log-probs
    _assert_logprobs(servers[1], trainer, prompt)
    # subsets: two dtypes as two flat buffers (SGLang's "flattened_bucket"), then one broadcast per tensor
    norm, head = trainer.model.norm.weight, trainer.lm_head.weight
    sender.send([("model.norm.weight", torch.full_like(norm, 0.5, dtype=torch.bfloat16)),
                 ("lm_head.weight", head * 2)], version="step-2")
    trainer.model.norm.weight.data.fill_(0.5)
    trainer.lm_head.weight.data.mul_(2)
    for c in servers:
        assert _assert_logprobs(c, trainer, prompt).weight_version == "step-2"
    sender.send([("model.norm.weight", torch.full_like(norm, 0.25))], version="step-2b", flattened=False)
    trainer.model.norm.weight.data.fill_(0.25)
    _assert_logprobs(servers[0], trainer, prompt)
    # an engine that refuses an update before joining its broadcast: an error, not a hang
    other = DistributedWeightSender.__new__(DistributedWeightSender)
    other.__dict__.update(sender.__dict__, group_name="no-such-group")
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(error=_raised(other.send, [("model.norm.weight", norm)])))
    t.start()
    t.join(60)
    assert not t.is_alive() and "no-such-group" in str(done["error"])
    with pytest.raises(RolloutError, match="failed in an earlier update"):  # its streams may be out of step
        other.send([("model.norm.weight", norm)])
    # then from disk back to the original
    save_pretrained(base, tmp_path / "back")
    for c in servers:
        c.update_weights_from_disk(str(tmp_path / "back"), version="step-3")
        g = c.generate(prompt, 8, temperature=0)[0]
        assert g.weight_version == "step-3" and g.output_ids == _greedy(base, prompt, 8)
