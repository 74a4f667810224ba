"""Training stages end to end through the CLI: config errors, SFT loss masks, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlfoundry.data.tokenizer import load_tokenizer, train_tokenizer
from rlfoundry.train.stages import ConfigError, load_stage_config, sft_tokens

SMALL = ["model_overrides={num_hidden_layers: 2, vocab_size: 320}", "seq_len=64", "batch_size=4",
         "micro_batch_size=2", "data.examples_per_level=40", "data.tasks=[arithmetic]", "log_every=1",
         "train.lr=3e-3", "train.warmup_steps=2"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*'train.lrr'"):
        load_stage_config(None, ["train.lrr=1"], "pretrain")
    with pytest.raises(ConfigError, match="field 'seq_len' must be int, got 'long'"):
        load_stage_config(None, ["seq_len=long"], "pretrain")
    with pytest.raises(ConfigError, match="field 'batch_size' \\(6\\) must be a multiple of micro_batch_size"):
        load_stage_config(None, ["batch_size=6", "micro_batch_size=4"], "sft")
    with pytest.raises(ConfigError, match="field 'model' must be a preset"):
        load_stage_config(None, ["model=/nowhere"], "sft")
    with pytest.raises(ConfigError, match="data.tasks.*unknown task 'chess'"):
        load_stage_config(None, ["data.tasks=[chess]"], "pretrain")
    f = tmp_path / "c.yaml"
    f.write_text("train: {optimizer: sgd}\n")
    with pytest.raises(ConfigError, match="optimizer must be 'muon' or 'adamw'"):
        load_stage_config(str(f), [], "pretrain")


def test_sft_masks_cover_only_assistant_tokens(tmp_path):
    train_tokenizer(["What is 1 + 2? <answer>3</answer>"] * 20, 300, tmp_path)
    tok = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "<answer>3</answer>"}]
    ids, mask = sft_tokens(tok, msgs)
    prompt = tok.encode(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)
    assert ids[: len(prompt)] == prompt and mask[: len(prompt)] == [0] * len(prompt)
    trained = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(trained[:-1]) == "<answer>3</answer>" and trained[-1] == tok.convert_tokens_to_ids("<|endoftext|>")


def _run(args, out, wait=True):
    cmd = [sys.executable, "-m", "rlfoundry.cli", *args, "--out", str(out), *SMALL]
    if wait:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_killed_and_resumed_repeats_the_uninterrupted_run(tmp_path):
    _run(["pretrain", "--max-steps", "8", "save_every=4"], tmp_path / "a")
    reference = _losses(tmp_path / "a")
    assert len(reference) == 8 and reference[-1] < reference[0]
    for f in ("loss.png", "hf/config.json", "hf/tokenizer.json", "config.yaml"):
        assert (tmp_path / "a" / f).exists(), f
    assert any((tmp_path / "a" / "tensorboard").iterdir())

    proc = _run(["pretrain", "--max-steps", "8", "save_every=4"], tmp_path / "b", wait=False)
    metrics = tmp_path / "b" / "metrics.jsonl"
    t = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() - t < 300 and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run([sys.executable, "-m", "rlfoundry.cli", "pretrain", "--out", str(tmp_path / "b")] + SMALL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--resume" in r.stderr  # an existing run is never overwritten
    _run(["pretrain", "--max-steps", "8", "save_every=4", "--resume"], tmp_path / "b")
    assert _losses(tmp_path / "b") == reference


def test_midtrain_sft_and_eval_run(tmp_path):
    _run(["pretrain", "--max-steps", "3"], tmp_path / "pt")
    _run(["midtrain", "--max-steps", "2", f"model={tmp_path / 'pt' / 'hf'}", "rope_theta=50000"], tmp_path / "mt")
    exported = json.loads((tmp_path / "mt" / "hf" / "config.json").read_text())
    assert exported["rope_theta"] == 50000 and exported["rope_parameters"]["rope_theta"] == 50000
    _run(["sft", "--max-steps", "3", f"model={tmp_path / 'pt' / 'hf'}"], tmp_path / "sft")
    r = subprocess.run([sys.executable, "-m", "rlfoundry.cli", "eval", "--model", str(tmp_path / "sft" / "hf"),
                        "--task", "arithmetic", "--level", "1", "--n", "8", "--max-new-tokens", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["per_level"] == {"1": result["accuracy"]}


def test_batch_size_warmup_ramps_and_streams_every_row_once_per_epoch():
    from rlfoundry.train.stages import StageConfig, batch_size_at, batches_for_step

    n = 40
    rows = {k: torch.arange(n)[:, None].repeat(1, 4) for k in ("input_ids", "loss_mask", "segment_ids", "position_ids")}
    cfg = StageConfig(batch_size=8, micro_batch_size=2, batch_size_start=2, batch_warmup_steps=4).validate()
    assert [batch_size_at(s, cfg) for s in range(6)] == [2, 2, 4, 6, 8, 8]
    seen = []
    for step in range(7):  # 2+2+4+6+8+8+8 = 38 rows: all of the 40 but 2 are in the first epoch
        batches = batches_for_step(rows, step, cfg)
        assert all(b.input_ids.shape[0] == 2 for b in batches)
        seen += [int(r) for b in batches for r in b.input_ids[:, 0]]
    assert len(seen) == 38 and len(set(seen)) == 38
    # without warm-up: fixed batches, epoch = whole batches of a seeded permutation
    flat = StageConfig(batch_size=8, micro_batch_size=8)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batches_for_step(rows, 1, flat)[0].input_ids[:, 0], order[8:16])
