"""Start-up: each process an RL run starts imports only what it needs (see the README, Reinforcement
learning, start-up). On 2 cores an RL run's first ~30 s are mostly imports competing for the CPU;
each module below took 1 – 3 s to import in every process that pulled it in."""

import subprocess
import sys

from rlfoundry.rl.config import DEFAULT_MODEL

CHECKS = f"""
import sys

def loaded(*names):
    return [n for n in names if n in sys.modules]

import rlfoundry.rollout.watchdog  # in front of every engine server and router of a run
assert not loaded("torch"), "the watchdog imports torch"

from rlfoundry.rl.config import load_rl_config  # the driver and every actor read the configuration
load_rl_config(None, [])
heavy = loaded("torch.distributed.checkpoint", "torch.distributed.tensor", "torch._dynamo", "transformers")
assert not heavy, f"reading a configuration imports {{heavy}}"

from rlfoundry.model import load_pretrained  # built on the meta device, then loaded
load_pretrained({DEFAULT_MODEL!r})
assert not loaded("torch._dynamo"), "loading a checkpoint imports torch._dynamo"

from rlfoundry.data.tokenizer import load_tokenizer
tok = load_tokenizer({DEFAULT_MODEL!r})
assert not loaded("transformers.models.auto.tokenization_auto"), "the tokenizer loads through AutoTokenizer"
assert type(tok).__name__ == "TokenizersBackend", type(tok)
"""


def test_each_process_imports_only_what_it_needs():
    res = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_fast_tokenizer_path_gives_autotokenizers_tokens():
    from transformers import AutoTokenizer

    from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer

    ours, auto = load_tokenizer(DEFAULT_MODEL), AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    messages = [{"role": "user", "content": "Using the numbers 3, 7 and 12, make 33."}]
    assert ours.apply_chat_template(messages, tokenize=True, add_generation_prompt=True) == \
        auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ours.encode("12 * 3 - 7 = 29 <answer>(12 * 3 - 7)</answer><|user|>")
    assert ids == auto.encode("12 * 3 - 7 = 29 <answer>(12 * 3 - 7)</answer><|user|>")
    assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert eos_token_ids(ours) == eos_token_ids(auto) and len(ours) == len(auto)
