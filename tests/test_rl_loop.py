"""The RL loop end to end on the shipped tiny model (Ray, an engine behind sglang-router, the SQLite
buffer, broadcast weight sync): metrics, on-policy exactness, the buffer's counts, debug modes,
config errors, and sync-mode reproducibility — two deterministic runs agree, and a run killed with
SIGKILL and resumed ends exactly like an uninterrupted one."""

import dataclasses
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlfoundry.cli import main
from rlfoundry.rl.config import load_rl_config
from rlfoundry.train.stages import ConfigError

SMALL = ["steps=3", "rollout.prompts_per_step=6", "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=32",
         "eval_n=8", "eval_every=3", "checkpoint_every=1", "train.lr=1e-4", "train.final_lr=1e-4",
         "data.curriculum=[{source: 'task:countdown:2', steps: 2}, {source: 'task:countdown:3'}]",
         "eval_sources=['task:countdown:2']"]


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def no_times(ms: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in ms]


def test_rl_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B writes its run file locally, no account needed
    freeze, frozen = gc.freeze, []
    monkeypatch.setattr(gc, "freeze", lambda: (frozen.append(True), freeze())[1])
    assert main(["rl", "--out", str(out), *SMALL, "weight_sync=disk", "save_rollouts=true", "rollout.max_len=96",
                 "wandb_project=rlfoundry-test", "eval_samples=3"]) == 0
    # the driver froze start-up's heap out of the collector for the steps, and let it go at the end
    assert frozen == [True] and gc.get_freeze_count() == 0
    ms = lines(out)
    assert [m["step"] for m in ms] == [0, 1, 2, 3]
    assert "eval/accuracy" in ms[0] and "eval/accuracy" in ms[-1]
    for m in (ms[0], ms[-1]):  # sampled evaluation: 8 prompts x 3 samples, accuracy a multiple of 1/24
        acc = m["eval_sampled/task:countdown:2"]
        assert m["eval_sampled/accuracy"] == acc and abs(acc * 24 - round(acc * 24)) < 1e-9
    trained = [m for m in ms[1:] if "train/mismatch_max" in m]
    assert trained, "no step had a group with a reward signal"
    for m in trained:  # trainer log-probs == engine log-probs up to fp32 rounding (typically 5e-6 at
        # worst, 2e-7 on average; 1.4e-5 seen once: batched decode and full forward round differently)
        assert m["train/mismatch_max"] <= 5e-5 and m["train/mismatch_mean"] <= 2e-6
    # the start-up (Ray, workers, engines, the step-0 evaluation) logged once, with the first step
    assert ms[1]["time/startup_s"] > ms[0]["time/eval_s"] and all("time/startup_s" not in m for m in ms[2:])
    for m in ms[1:]:
        assert 0.0 <= m["reward/mean"] <= 1.0
        for phase in ("rollout", "train", "weight_sync"):  # a step with no reward signal trains nothing
            assert m[f"time/{phase}_s"] > 0 or (phase == "train" and m["train/skipped"] == 1.0)
    assert (out / "curves.png").stat().st_size > 0 and (out / "hf" / "config.json").exists()
    assert len(list((out / "rollouts").glob("*.jsonl"))) == 3
    [wandb_run] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"reward/mean" in wandb_run.read_bytes() and b"eval/accuracy" in wandb_run.read_bytes()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["prompts_served"] == 18 and counts["samples_generated"] == 72
    assert counts["samples_trained"] + counts["samples_filtered"] == 72 and counts["groups_pending"] == 0
    # train-only replays the stored rollouts; rollout-only generates without training
    replay = tmp_path / "replay"
    assert main(["rl", "--out", str(replay), *SMALL, "debug=train_only", f"debug_rollouts_from={out}"]) == 0
    assert [m.get("train/samples") for m in lines(replay)] == [m.get("train/samples") for m in ms[1:]]
    assert any(m.get("train/samples") for m in lines(replay))
    ro = tmp_path / "rollout_only"
    # (with a time limit that one step already uses up: it stops there, evaluated)
    assert main(["rl", "--out", str(ro), *SMALL, "debug=rollout_only", "max_minutes=1e-4"]) == 0
    assert [m["step"] for m in lines(ro)] == [0, 1] and lines(ro)[-1]["stopped/max_minutes"] == 1e-4
    assert "train/loss" not in lines(ro)[-1] and "reward/mean" in lines(ro)[-1] and "eval/accuracy" in lines(ro)[-1]


def test_time_limited_schedule_ends_at_the_last_step_that_fits():
    """Under max_minutes the learning-rate decay ends where the time runs out: at a mean step time
    of 2 s, with 100 s used of 8 minutes after 50 steps, 190 more steps fit (this one included);
    30 fewer when a minute of the limit is kept for the run's start-up and end."""
    from rlfoundry.rl.loop import _horizon
    from rlfoundry.train.trainer import Trainer

    cfg = load_rl_config(None, ["max_minutes=8", "train.total_steps=500"])
    assert _horizon(cfg, 50, 50, 100.0) == 240
    assert _horizon(cfg, 50, 50, 100.0, reserved_s=60.0) == 210
    assert _horizon(cfg, 50, 0, 0.0) is None  # nothing timed yet: the schedule's own total_steps
    assert _horizon(cfg, 50, 50, 10.0) == 500  # a fast machine: total_steps comes first
    assert _horizon(cfg, 239, 239, 479.0) == 240  # out of time: this step is the last
    two = load_rl_config(None, ["max_minutes=8", "train.total_steps=500", "algorithm.updates_per_rollout=2"])
    assert _horizon(two, 100, 50, 100.0) == 100 + 2 * 190  # counted in optimizer steps
    assert _horizon(load_rl_config(None, ["train.total_steps=500"]), 50, 50, 100.0) is None
    from rlfoundry.model import Glm4MoeForCausalLM, ModelConfig

    trainer = Trainer(Glm4MoeForCausalLM(ModelConfig.from_preset("tiny")), cfg.train)
    trainer.cfg = dataclasses.replace(cfg.train, lr=1e-4, final_lr=1e-5, warmup_steps=0)
    mid = trainer.lr_at(120)
    trainer.horizon = 240
    assert trainer.lr_at(120) == pytest.approx(5.5e-5) and trainer.lr_at(240) == pytest.approx(1e-5)
    assert mid == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 120 / 500)))


def test_bad_configs_name_the_field(tmp_path):
    cases = {"nonsense=1": "unknown field", "max_minutes=-1": "max_minutes", "rollout.temperature=0": "rollout.temperature",
             "model=/nope": "field 'model'", "algorithm.advantage=ppo": "algorithm.advantage",
             "rollout.n_samples_per_prompt=x": "rollout.n_samples_per_prompt",
             "reward.fn=no.such.fn": "reward.fn", "algorithm.policy_loss=gspo": None,
             "data.curriculum=[{source: /missing.jsonl}]": "data.curriculum[0].source",
             "debug=train_only": "debug_rollouts_from", "eval_samples=-1": "eval_samples",
             "data.skip_solved=1.5": "data.skip_solved", "data.skip_unsolved=-0.1": "data.skip_unsolved",
             "rollout.max_len=96": "rollout.max_len", "rollout.max_len=-1": "rollout.max_len",
             "rollout.max_len=97": None, "rollout.engine_threads=-1": "rollout.engine_threads",
             "rollout.max_len=4096": "max_position_embeddings",
             "rollout.engine_threads=1": None, "device=tpu": "field 'device'", "device=cpu": None,
             "algorithm.hindsight=-1": "algorithm.hindsight", "algorithm.hindsight_per_group=0": "hindsight_per_group",
             "algorithm.hindsight_fn=no.such.fn": "algorithm.hindsight_fn", "algorithm.hindsight=1": None,
             "algorithm.positive_weight=0": "algorithm.positive_weight", "algorithm.positive_weight=2": None,
             "algorithm.oversample_margin=0.9": "algorithm.oversample_margin", "algorithm.oversample_margin=1.2": None}
    for override, field in cases.items():
        if field is None:
            load_rl_config(None, [override])
            continue
        with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
            load_rl_config(None, [override])
    with pytest.raises(ConfigError, match="field 'exact'"):
        load_rl_config(None, ["exact=true", "train.bf16=true"])
    with pytest.raises(ConfigError, match="field 'algorithm.hindsight'.*routing_replay"):
        load_rl_config(None, ["algorithm.hindsight=1", "rollout.routing_replay=true"])
    import torch

    if not torch.cuda.is_available():  # device cuda where no GPU is visible: refused before anything starts
        with pytest.raises(ConfigError, match="field 'device'.*no CUDA device"):
            load_rl_config(None, ["device=cuda"])
    with pytest.raises(ConfigError, match="field 'batch_invariant'.*device cuda"):
        load_rl_config(None, ["device=cuda", "batch_invariant=true", "ray_address=auto"])  # a cluster's GPUs
    for other in ("exact=true", "train.bf16=true", "train.compile=inductor", "rollout.compile_decode=true"):
        with pytest.raises(ConfigError, match=f"field 'batch_invariant'.*{other.split('=')[0]}"):
            load_rl_config(None, ["batch_invariant=true", other])
    # engines: which kind, and someone else's
    urls = "rollout.engine_urls=['http://127.0.0.1:1', 'http://127.0.0.1:2']"
    for overrides, field in {("rollout.backend=sglang",): "rollout.backend",
                             ("rollout.engine_urls=['127.0.0.1:3000']",): r"rollout.engine_urls\[0\]",
                             ("rollout.engine_urls=['http://h:1/generate']",): r"rollout.engine_urls\[0\]",
                             (urls, "rollout.num_engines=3"): "rollout.num_engines",
                             (urls, "rollout.engine_args=['--x']"): "rollout.engine_args",
                             ("rollout.engine_args=[1]",): "rollout.engine_args",
                             ("rollout.backend=vllm", urls): "field 'weight_sync'.*vllm backend takes disk",
                             ("rollout.backend=vllm", urls, "weight_sync=disk", "batch_invariant=true"):
                                 "field 'batch_invariant'.*rlfoundry engine",
                             ("rollout.backend=vllm", urls, "weight_sync=disk", "rollout.routing_replay=true"):
                                 "field 'rollout.routing_replay'"}.items():
        with pytest.raises(ConfigError, match=field):
            load_rl_config(None, list(overrides))
    load_rl_config(None, [urls, "rollout.num_engines=2"])
    load_rl_config(None, ["rollout.backend=vllm", urls, "weight_sync=disk"])  # vLLM elsewhere: not needed here
    from rlfoundry.rollout.launch import VLLMBackend

    if VLLMBackend().missing():  # vLLM to be started here, where it is not installed
        with pytest.raises(ConfigError, match="field 'rollout.backend'.*vLLM is not installed"):
            load_rl_config(None, ["rollout.backend=vllm", "weight_sync=disk"])


@pytest.mark.parametrize("mode", ["exact=true", "batch_invariant=true"])
def test_exact_modes_end_to_end_have_zero_mismatch(tmp_path, mode):
    """exact: true (fp64 arithmetic) and batch_invariant: true (fp32) through the real loop (two
    engine servers behind the router, each on one thread, broadcast weight sync of the fp32 weights
    to both, two data-parallel trainers): the trainers' log-probs equal the engines' in every step,
    whichever engine generated a group and whichever trainer trained it — the trainers' summed
    gradients keep their weights equal bit for bit (the loop checks it at the end), the engines get
    rank 0's, and the checkpoint is saved by both."""
    out = tmp_path / "run"
    assert main(["rl", "--out", str(out), *SMALL, mode, "eval_every=0", "checkpoint_every=3",
                 "rollout.num_engines=2", "num_trainers=2"]) == 0
    trained = [m for m in lines(out)[1:] if "train/mismatch_max" in m]
    assert trained, "no step had a group with a reward signal"
    assert all(m["train/mismatch_max"] == 0.0 for m in trained), [m["train/mismatch_max"] for m in trained]
    # two engines behind the router, both updated every step, the cores shared out between them
    engines = json.loads((out / "engines.json").read_text())
    assert len(engines) == 2 and len({e["url"] for e in engines}) == 2
    assert [e["torch_threads"] for e in engines] == [max(1, (os.cpu_count() or 1) // 2)] * 2


# with DAPO's dynamic-sampling refill, the draws oversampled: a kill may land between refill rounds
REPRO = [*SMALL, "steps=4", "eval_every=0", "deterministic=true", "algorithm.refill_rounds=2",
         "algorithm.oversample=true"]


def _run(out: Path, args=REPRO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlfoundry.cli", "rl", "--out", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill_after_two_lines(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(lines(out)) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: driver, Ray, engines
    proc.wait()


def test_deterministic_runs_repeat_and_resume_after_sigkill(tmp_path, capsys):
    a = tmp_path / "a"
    assert main(["rl", "--out", str(a), *REPRO]) == 0
    ms = lines(a)
    for i, m in enumerate(ms):  # refills keep drawing until 6 groups have a signal or 2 extra rounds are done
        assert m["groups_kept"] >= 6 or m["rollout/refill_rounds"] == 2
        assert 0 <= m["rollout/refill_rounds"] <= 2 and m.get("train/samples", 0) == 4 * m["groups_kept"]
        recent = ms[max(0, i - 4):i]  # the first draw: 6 prompts / the last 4 steps' fraction kept
        drawn, kept = sum(r["groups_kept"] + r["groups_filtered"] for r in recent), sum(r["groups_kept"] for r in recent)
        first = min(24, math.ceil(6 * drawn / max(kept, 1))) if drawn else 6
        assert m["groups_kept"] + m["groups_filtered"] >= first
        assert m["rollout/refill_rounds"] == 0 or m["groups_kept"] + m["groups_filtered"] > first
    assert any(m["groups_kept"] + m["groups_filtered"] > 6 for m in ms)
    capsys.readouterr()
    assert main(["inspect", str(a)]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["prompts_served"] == sum(m["groups_kept"] + m["groups_filtered"] for m in ms)
    b = tmp_path / "b"
    _kill_after_two_lines(_run(b), b)
    assert 2 <= len(lines(b)) < 4
    assert main(["rl", "--out", str(b), "--resume", *REPRO]) == 0
    assert no_times(lines(b)) == no_times(lines(a))
    assert (a / "hf" / "model.safetensors").read_bytes() == (b / "hf" / "model.safetensors").read_bytes()
    # SIGTERM to the driver alone: it stops its engines and its Ray instance, exits with 128 + 15,
    # and leaves no process behind in its session (resuming is the SIGKILL case above: the stop
    # touches neither the buffer nor the checkpoints)
    c = tmp_path / "c"
    proc = _run(c)
    deadline = time.time() + 300
    while time.time() < deadline and not ((c / "metrics.jsonl").exists() and len(lines(c)) >= 2):
        time.sleep(0.2)
    proc.terminate()
    assert proc.wait(120) == 143
    time.sleep(2)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _session(p) == proc.pid]
    assert not left, [(p / "cmdline").read_bytes() for p in left]
    assert no_times(lines(c)) == no_times(lines(a))[:len(lines(c))]


# the demo's layout: two engines behind the router, two data-parallel trainers, requests concurrent
INVARIANT = [*SMALL, "steps=4", "eval_every=0", "batch_invariant=true", "rollout.num_engines=2", "num_trainers=2",
             "algorithm.refill_rounds=2", "algorithm.oversample=true"]


def test_batch_invariant_runs_repeat_and_resume_after_sigkill_without_deterministic(tmp_path):
    """batch_invariant alone makes a run reproducible at full speed: with every sequence computed
    as if alone, the engines' batching (which requests arrive together, at which engine) no longer
    changes a bit, so deterministic's one request in flight is not needed — a run killed with SIGKILL
    and resumed ends with the metrics and weights of an uninterrupted one (up to timings). (Under
    max_minutes the number of steps and the learning rate's horizon follow the clock, by design.)"""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["rl", "--out", str(a), *INVARIANT]) == 0
    assert any(m.get("train/samples") for m in lines(a))
    _kill_after_two_lines(_run(b, INVARIANT), b)
    assert 2 <= len(lines(b)) < 4
    assert main(["rl", "--out", str(b), "--resume", *INVARIANT]) == 0
    assert no_times(lines(b)) == no_times(lines(a))
    assert (a / "hf" / "model.safetensors").read_bytes() == (b / "hf" / "model.safetensors").read_bytes()


def _session(proc_dir: Path) -> int | None:
    try:  # field 6 of /proc/PID/stat, after the parenthesised command name
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def test_routing_replay_trains_on_the_engines_expert_choices(tmp_path):
    from rlfoundry.buffer import Buffer
    from rlfoundry.model import ModelConfig

    out = tmp_path / "replay"
    assert main(["rl", "--out", str(out), *SMALL, "steps=1", "eval_every=0", "rollout.routing_replay=true",
                 "algorithm.filter_zero_variance=false"]) == 0
    cfg = ModelConfig.from_json_file(Path(load_rl_config(None, []).model) / "config.json")
    samples = [s for g in Buffer(out / "buffer.sqlite").groups(0, ("trained",)) for s in g]
    assert samples
    for s in samples:  # every token the engine ran through the model: prompt + response - 1
        assert len(s.routed_experts) == len(s.prompt_ids) + len(s.response_ids) - 1
        assert len(s.routed_experts[0]) == cfg.num_moe_layers and len(s.routed_experts[0][0]) == cfg.num_experts_per_tok
    assert lines(out)[-1]["train/mismatch_max"] <= 5e-5 and lines(out)[-1]["train/mismatch_mean"] <= 2e-6


def test_rl_drives_engines_it_did_not_start(tmp_path):
    """rollout.engine_urls: the loop drives engine servers someone else runs (ours here, as SGLang's
    would be) instead of starting its own. A batch-invariant one gets every step's weights by
    broadcast and log-probs the trainer matches bit for bit; a second run joins it again (a new
    weight-update group); a run that needs what it does not run (float64 for exact) is refused,
    naming the field."""
    from rlfoundry.rl.config import DEFAULT_MODEL
    from rlfoundry.rollout.client import SGLangClient
    from rlfoundry.rollout.launch import free_port, wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "rlfoundry.cli", "serve", "--model", DEFAULT_MODEL, "--port",
                               str(port), "--max-batch", "64", "--max-len", "128", "--batch-invariant",
                               "--log-level", "error"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_healthy(url + "/health", 120, [server])
        out = tmp_path / "run"
        assert main(["rl", "--out", str(out), *SMALL, "steps=2", "eval_every=0", "batch_invariant=true",
                     f"rollout.engine_urls=['{url}']"]) == 0
        trained = [m for m in lines(out)[1:] if "train/mismatch_max" in m]
        assert trained and all(m["train/mismatch_max"] == 0.0 for m in trained)
        assert SGLangClient(url).server_info()["weight_version"] == "2"  # the weights of the run's last step
        assert [e["url"] for e in json.loads((out / "engines.json").read_text())] == [url]
        again = tmp_path / "again"
        assert main(["rl", "--out", str(again), *SMALL, "steps=1", "eval_every=0", "batch_invariant=true",
                     f"rollout.engine_urls=['{url}']"]) == 0
        assert SGLangClient(url).server_info()["weight_version"] == "1"
        from rlfoundry.rl.workers import RolloutWorker

        exact = load_rl_config(None, ["exact=true", f"rollout.engine_urls=['{url}']"])
        with pytest.raises(RuntimeError, match=r"rollout.engine_urls\[0\].*float64"):
            RolloutWorker(exact, str(tmp_path))  # (what the loop starts first, before it trains)
        assert server.poll() is None  # the engine serves on
    finally:
        server.terminate()
        server.wait(30)


def test_a_local_ray_instance_runs_its_workers_at_the_callers_priority(monkeypatch):
    """Ray starts workers 15 nice levels down by default: every actor of the loop (and the engine
    servers they start) would wait behind any other busy process. The loop's own instance keeps
    the caller's priority, and leaves the environment as it found it."""
    import ray

    from rlfoundry.rl.loop import WORKER_NICENESS, _init_ray

    monkeypatch.delenv(WORKER_NICENESS, raising=False)
    _init_ray(ray, None)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def niceness(self) -> int:
                return os.nice(0)

        assert ray.get(Probe.remote().niceness.remote()) == os.nice(0)
        assert WORKER_NICENESS not in os.environ
    finally:
        ray.shutdown()
