"""`rlfoundry rl`: the RL loop on Ray, synchronous (colocated) or asynchronous (disaggregated).

The trainer, the rollout side (engines behind sglang-router) and the buffer run as three Ray actors
(a local Ray instance unless `ray_address` names a cluster). Each step:

    buffer.requests -> rollout.generate (+ rewards as groups finish) -> buffer.put
    -> trainer.train -> buffer.mark_trained -> weight sync (broadcast or disk) -> eval -> checkpoint

In async mode the first line runs in a thread of its own (`_RolloutsAhead`), up to max_staleness
rollouts ahead of the rest, and the weight sync reaches the engines while they generate.

Resume (`--resume`): the trainer reloads its last checkpoint (step S), the buffer rolls back what
was trained after S, and the loop continues at rollout S: rollouts already stored are trained from
the database, pending ones are generated again (with the same seeds), so the run continues as if
never killed. Everything a step produces is in `metrics.jsonl` (one object per step), TensorBoard,
PNG curves and, optionally, Weights & Biases.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import yaml

from rlfoundry.rl.config import RLConfig
from rlfoundry.train.stages import ConfigError


def _ray():
    import ray

    return ray


def _accuracy(groups: list[list[dict]]) -> float:
    from rlfoundry.rl.sample import Sample

    vals = [Sample(**s).correct for g in groups for s in g]
    return sum(vals) / max(len(vals), 1)


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [m["step"] for m in metrics if "reward/mean" in m]
    axes[0].plot(steps, [m["reward/mean"] for m in metrics if "reward/mean" in m], label="train reward (mean)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("reward")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    evals = [m for m in metrics if "eval/accuracy" in m]
    for key in sorted({k for m in evals for k in m if k.startswith("eval/") and k != "eval/accuracy"}):
        axes[1].plot([m["step"] for m in evals if key in m], [m[key] for m in evals if key in m], "o-",
                     label=key.removeprefix("eval/"), alpha=0.7)
    axes[1].plot([m["step"] for m in evals], [m["eval/accuracy"] for m in evals], "ko-", label="mean", lw=2)
    sampled = [m for m in evals if "eval_sampled/accuracy" in m]
    if sampled:
        axes[1].plot([m["step"] for m in sampled], [m["eval_sampled/accuracy"] for m in sampled], "ks--",
                     label="mean, sampled (avg@k)", lw=2)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("held-out accuracy (greedy; dashed: sampled)" if sampled else "held-out accuracy (greedy)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Logger:
    """metrics.jsonl + TensorBoard + optional W&B; on resume, lines after the checkpoint are dropped."""

    def __init__(self, out: Path, cfg: RLConfig, keep_steps: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        self.metrics: list[dict] = []
        if keep_steps is not None and self.path.exists():
            self.metrics = [m for m in map(json.loads, filter(str.strip, self.path.read_text().splitlines()))
                            if m["step"] <= keep_steps]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in self.metrics))
        self.tb = SummaryWriter(str(out / "tensorboard"))
        self.wandb = None
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=str(out))

    def log(self, m: dict) -> None:
        self.metrics.append(m)
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, m["step"])
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(m, step=m["step"])

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _exit_on_sigterm(stopped_by: list[int]):
    """SIGTERM (a scheduler's stop, `kill`) raises SystemExit, so that the run stops its engines
    and the Ray instance it started instead of dying with them orphaned; the signal number is
    appended to `stopped_by`. Returns a function that puts the previous handler back (the default
    one when that was not a Python handler, as Ray's is); a no-op off the main thread, where
    signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        stopped_by.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def run_rl(cfg: RLConfig, out: str | Path, resume: bool = False, console=None) -> dict:
    """Run RL into `out`; returns {"before": eval, "after": eval, "metrics": [...]}."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    t_run = time.perf_counter()  # max_minutes counts from here
    console = console or Console()
    out = Path(out).resolve()
    ckpt = out / "checkpoints" / "latest"
    if (out / "metrics.jsonl").exists() and not resume:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    ray = _ray()
    started_ray = not ray.is_initialized()
    buffer = trainer = rollout = ahead = None
    froze = False  # this process's heap frozen by this run (see below)
    trainers: list = []
    restore_sigterm, stopped_by = (lambda: None), []
    try:
        if started_ray:
            _init_ray(ray, cfg.ray_address)
        restore_sigterm = _exit_on_sigterm(stopped_by)  # after ray.init, which installs a handler of its own
        from rlfoundry.rl.workers import BufferWorker, RolloutWorker, TrainerWorker
        from rlfoundry.rollout.launch import freeze_heap

        db, fresh_copy = None, False
        if cfg.debug == "train_only":  # replay another run's rollouts: copy its database
            db = out / "buffer.sqlite"
            if not db.exists():
                src = Path(cfg.debug_rollouts_from) / "buffer.sqlite"
                import sqlite3

                with sqlite3.connect(src) as a, sqlite3.connect(db) as b:
                    a.backup(b)  # a consistent copy, WAL included
                fresh_copy = True
        opts = dict(num_cpus=0, max_concurrency=1)
        buffer = ray.remote(BufferWorker).options(**opts).remote(cfg, str(out), str(db) if db else None)
        # async mode: the rollout actor generates, evaluates and updates its engines' weights at once;
        # with device cuda its engines get GPUs of their own (Ray's, as the trainers get theirs)
        # rather than sharing the trainers' (sync mode's colocation)
        rollout_opts = opts
        if cfg.mode == "async":
            own_gpus = cfg.device == "cuda" and not cfg.rollout.engine_urls
            rollout_opts = opts | dict(max_concurrency=4, **({"num_gpus": cfg.rollout.num_engines} if own_gpus else {}))
        if cfg.debug != "rollout_only":
            gpu = {"num_gpus": 1} if cfg.device == "cuda" else {}
            trainers = [ray.remote(TrainerWorker).options(**opts, **gpu).remote(cfg, str(out))
                        for _ in range(cfg.num_trainers)]
            trainer = trainers[0]
        visible = None if cfg.ray_address else os.environ.get("CUDA_VISIBLE_DEVICES")  # this machine's, not a node's
        if "num_gpus" in rollout_opts:
            visible = "ray"  # the GPUs Ray gave the rollout actor
        rollout = ray.remote(RolloutWorker).options(**rollout_opts).remote(cfg, str(out), visible) \
            if cfg.debug != "train_only" else None
        # (every actor is created before anything waits on one: the engines start while the trainers load)
        if len(trainers) > 1:  # data-parallel trainers join one process group; rank 0 leads
            address, port = ray.get(trainers[0].address.remote())
            ray.get([t.join_group.remote(address, port, r, len(trainers)) for r, t in enumerate(trainers)])
        # the engines are up (started or found) before any phase is timed
        engine_urls = ray.get(rollout.urls.remote()) if rollout is not None else []
        start, extra = 0, {}
        if fresh_copy:  # everything the other run trained is to be trained here
            ray.get(buffer.rollback.remote(-1))
        if resume and ckpt.exists():
            extra = ray.get([t.load_checkpoint.remote(str(ckpt)) for t in trainers])[0]
            start = extra["rollout_step"]
            ray.get(buffer.rollback.remote(ray.get(trainer.step.remote())))
            console.print(f"resumed from {ckpt} at rollout step {start}")
        logger = _Logger(out, cfg, keep_steps=start if resume else None)
        if resume and start > 0 and "metrics" in extra and not any(m["step"] == start for m in logger.metrics):
            logger.log(extra["metrics"])  # killed between the checkpoint and its step's line: the line
        version = start
        if rollout is not None and trainer is not None:
            if cfg.weight_sync == "distributed":
                ray.get(trainer.connect_engines.remote(engine_urls))  # joins while the engines join
            if start > 0:  # the engines start from the base model: bring them to the checkpoint
                _sync(ray, cfg, trainer, rollout, out, version)
        eval_sets = ray.get(buffer.eval_requests.remote()) if rollout is not None and cfg.eval_every else {}

        def evaluate(step: int) -> dict:
            t0 = time.perf_counter()
            res = {}
            for name, reqs in eval_sets.items():
                res[f"eval/{name}"] = _accuracy(ray.get(rollout.generate.remote(reqs, True, 1)))
            if res:
                res["eval/accuracy"] = sum(res.values()) / len(res)
            if cfg.eval_samples:
                sampled = {f"eval_sampled/{name}": _accuracy(ray.get(rollout.generate.remote(reqs, False,
                                                                                             cfg.eval_samples)))
                           for name, reqs in eval_sets.items()}
                res.update(sampled)
                res["eval_sampled/accuracy"] = sum(sampled.values()) / len(sampled)
            if res:
                res["time/eval_s"] = time.perf_counter() - t0
            return res

        before = {}
        if eval_sets and start == 0:
            before = evaluate(0)
            logger.log({"step": 0, **before})
            console.print(f"step 0  held-out accuracy {before['eval/accuracy']:.3f}"
                          + (f" (sampled {before['eval_sampled/accuracy']:.3f})" if cfg.eval_samples else ""))
        elif eval_sets:
            before = next((m for m in logger.metrics if m["step"] == 0 and "eval/accuracy" in m), {})
        last_eval = before
        # start-up's heap out of the collector's full passes (`freeze_heap`), in every actor and in
        # this process until the run ends: here, unfrozen, a full pass had grown to 0.18 - 0.22 s by
        # the end of start-up (8 in a 12-step run of benchmarks/bench_rl_vs_trl.py's setting, 1.04 s
        # in all); frozen, none in the steps, whose passes took 27 ms in all (session 42)
        ray.get([a.freeze_heap.remote() for a in (buffer, *trainers, rollout) if a is not None])
        if not gc.get_freeze_count():  # (a caller that froze objects of its own keeps its settings)
            froze = True
            freeze_heap()

        def generate_rollout(step: int, version_now, stopping=lambda: False) -> dict:
            """Generate rollout `step` into the buffer: its prompts, then refill rounds while any
            are due; `version_now()` is the engines' policy version when each round is requested;
            no further round once `stopping()`."""
            t0 = time.perf_counter()
            m = {"time/generate_s": 0.0}  # of which: generating and scoring (the rest is the buffer's)
            reqs = ray.get(buffer.requests.remote(step, version_now()))
            while reqs and not stopping():
                t1 = time.perf_counter()
                groups = rollout.generate.remote(reqs)  # a reference: the samples go from the
                ray.wait([groups])                      # rollout worker to the buffer directly
                m["time/generate_s"] += time.perf_counter() - t1
                ray.get(buffer.put.remote(groups))
                reqs = ray.get(buffer.requests.remote(step, version_now()))
            m["time/rollout_s"] = time.perf_counter() - t0
            return m

        ahead = None
        if cfg.mode == "async" and rollout is not None and start < cfg.steps:
            ahead = _RolloutsAhead(generate_rollout, start, cfg.max_staleness)
        with Progress(TextColumn("[bold]rl"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("rl", total=cfg.steps, completed=start, info="")
            t_first = time.perf_counter()
            last_checkpoint_s = 0.0

            def reserved_s() -> float:
                """What max_minutes must also hold besides the steps: the time up to the first step,
                and after the last one its evaluation, checkpoint and the shut-down (as long as the
                last evaluation and checkpoint took, and SHUTDOWN_RESERVE_S)."""
                return (t_first - t_run) + last_eval.get("time/eval_s", 0.0) + last_checkpoint_s + SHUTDOWN_RESERVE_S
            train_step = ray.get(trainer.step.remote()) if trainer is not None else 0
            for step in range(start, cfg.steps):
                m = {"step": step + 1}
                if step == start:  # what max_minutes also counts: Ray, the workers, engines, step 0's evaluation
                    m["time/startup_s"] = t_first - t_run
                t_step = time.perf_counter()
                if ahead is not None:  # generated (or being generated) while earlier steps trained
                    t0 = time.perf_counter()
                    m.update(ahead.result(step))
                    m["time/rollout_wait_s"] = time.perf_counter() - t0
                elif rollout is not None:
                    m.update(generate_rollout(step, lambda: version))
                if trainer is not None:
                    horizon = _horizon(cfg, train_step, step - start, time.perf_counter() - t_first, reserved_s())
                    if horizon is not None:
                        m["train/horizon"] = horizon
                    # buffer -> trainers, a reference (async: groups older than the staleness bound left out)
                    groups = buffer.training_groups.remote(step, step - cfg.max_staleness if ahead else None)
                    m.update(ray.get([t.train.remote(groups, horizon, step) for t in trainers])[0])
                    train_step = ray.get(trainer.step.remote())
                    ray.get(buffer.mark_trained.remote(step, train_step))
                    version = step + 1
                    if rollout is not None:  # (async: the engines are generating, paused for it)
                        m["time/weight_sync_s"] = _sync(ray, cfg, trainer, rollout, out, version,
                                                        pause=ahead is not None)
                    if ahead is not None:
                        ahead.trained(version)
                # after training: the groups async mode filtered as stale count as filtered
                m.update(ray.get(buffer.step_stats.remote(
                    step, str(out / "rollouts" / f"step_{step:06d}.jsonl") if cfg.save_rollouts else None)))
                last = step + 1 == cfg.steps
                if cfg.max_minutes and not last:  # would one more step, then the end, pass the limit?
                    if _steps_that_fit(cfg, step + 1 - start, time.perf_counter() - t_first, reserved_s()) < 1:
                        last = True
                        m["stopped/max_minutes"] = cfg.max_minutes
                if last and ahead is not None:  # the rollout being generated ahead stays pending
                    ahead.close()
                if eval_sets and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                    last_eval = evaluate(step + 1)
                    m.update(last_eval)
                if trainer is not None and (last or (step + 1) % cfg.checkpoint_every == 0):
                    t0 = time.perf_counter()
                    # the step's metrics go with it: a kill after the checkpoint and before the line
                    # below is written would otherwise lose the line (the resumed run starts after it)
                    ray.get([t.save_checkpoint.remote(str(ckpt), {"rollout_step": step + 1, "metrics": dict(m)})
                             for t in trainers])
                    m["time/checkpoint_s"] = last_checkpoint_s = time.perf_counter() - t0
                m["time/step_s"] = time.perf_counter() - t_step
                logger.log(m)
                info = f"reward {m.get('reward/mean', float('nan')):.3f}"
                if "eval/accuracy" in m:
                    info += f"  eval {m['eval/accuracy']:.3f}"
                if "train/mismatch_max" in m:
                    info += f"  mismatch {m['train/mismatch_max']:.1e}"
                progress.update(task, completed=step + 1, info=info)
                if "stopped/max_minutes" in m:
                    console.print(f"max_minutes={cfg.max_minutes:g} reached: stopped after step {step + 1} of {cfg.steps}")
                    break
        logger.close()
        _plot(logger.metrics, out / "curves.png")
        result = {"before": before, "after": last_eval, "metrics": logger.metrics,
                  "buffer": ray.get(buffer.counts.remote())}
        if trainer is not None:
            ray.get(trainer.save_hf.remote(str(out / "hf")))
            digests = ray.get([t.weights_digest.remote() for t in trainers])
            if len(set(digests)) > 1:  # every step is taken by all of them alike: this is a bug
                raise RuntimeError(f"the data-parallel trainers' weights differ at the end: {digests}")
            result["weights_digest"] = digests[0]
        return result
    finally:
        if froze:
            gc.unfreeze()  # what this run froze is the collector's again
        if ahead is not None:
            ahead.close()
        if rollout is not None:
            ray.get(rollout.shutdown.remote())
        for actor in (buffer, rollout, *trainers):
            if actor is not None:
                ray.kill(actor)
        if started_ray and ray.is_initialized():
            ray.shutdown()
        restore_sigterm()
        if stopped_by:  # Ray's get() turns the SystemExit into exit code 1: keep the signal's
            raise SystemExit(128 + stopped_by[0])


class _RolloutsAhead:
    """Async mode's generation: a thread of the driver that generates rollout after rollout into
    the buffer (`generate(step, version_now, stopping)`), starting rollout r once rollout r - max_staleness
    is trained (`trained`), while the loop trains the earlier ones; `result(step)` waits for
    rollout `step` and returns its timings. The policy version requests carry is the engines' as
    `trained` last set it: a weight update that lands while a round is in flight makes the samples
    newer than their version says, never older, so staleness is never under-counted. `close` stops
    it after the round in flight (the rest of that rollout stays pending in the buffer, and a
    resumed run generates it again)."""

    def __init__(self, generate, first: int, max_staleness: int):
        self._generate, self._max_staleness = generate, max_staleness
        self._cond = threading.Condition()
        self._trained = first  # rollouts trained so far: the engines' policy version
        self._done: dict[int, dict] = {}
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(first,), name="rollouts-ahead", daemon=True)
        self._thread.start()

    def _version(self) -> int:
        with self._cond:
            return self._trained

    def _run(self, step: int) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or step - self._trained <= self._max_staleness)
                    if self._stop:
                        return
                times = self._generate(step, self._version, lambda: self._stop)
                with self._cond:
                    self._done[step] = times
                    self._cond.notify_all()
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def result(self, step: int) -> dict:
        with self._cond:
            self._cond.wait_for(lambda: step in self._done or self._error is not None or self._stop)
            if step in self._done:
                return self._done.pop(step)
        raise RuntimeError(f"generating rollout {step} failed: {self._error!r}") from self._error

    def trained(self, version: int) -> None:
        """The engines now hold the weights of `version` (rollouts trained so far)."""
        with self._cond:
            self._trained = version
            self._cond.notify_all()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout_s)


WORKER_NICENESS = "RAY_worker_niceness"


def _init_ray(ray, address: str | None) -> None:
    """`ray.init`: connect to the cluster at `address`, or start a local instance whose workers run
    at this process's own priority. Ray starts its workers 15 nice levels below the process that
    starts it (`RAY_worker_niceness`, default 15: on a cluster, daemons before tasks), and every
    actor of the loop, the engine servers included, would inherit that: beside any other busy
    process the whole run waits (measured here: with a two-thread torch job alongside, a
    two-minute demo-configuration run spent 152 s starting up and trained 1 step, against 22.8 s
    and 30 steps of 2.2 s at the same priority). A `RAY_worker_niceness` already set is kept."""
    set_here = not address and WORKER_NICENESS not in os.environ
    if set_here:
        os.environ[WORKER_NICENESS] = "0"  # read by the raylet that ray.init starts, and only then
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=True, logging_level="ERROR",
                 configure_logging=True)
    finally:
        if set_here:
            del os.environ[WORKER_NICENESS]


SHUTDOWN_RESERVE_S = 15.0
"""Seconds that max_minutes keeps for what follows the last step's evaluation and checkpoint:
the plot, the Hugging Face save, stopping the engines and Ray (3 s measured here for the demo)."""


def _horizon(cfg: RLConfig, train_step: int, steps_done: int, elapsed_s: float, reserved_s: float = 0.0) -> int | None:
    """The optimizer step at which the learning-rate schedule ends when max_minutes will stop the
    run before train.total_steps: the steps that fit in the time left at the mean step time so far
    (the same estimate as the stopping rule's), so that the decay completes on a slow machine as on
    a fast one. None (the schedule's own total_steps) without max_minutes or before the first step
    is timed. It follows the clock: a time-limited run is not replayable step for step."""
    if not cfg.max_minutes or steps_done == 0:
        return None
    left = max(1, _steps_that_fit(cfg, steps_done, elapsed_s, reserved_s))  # this one included
    return min(cfg.train.total_steps, train_step + left * cfg.algorithm.updates_per_rollout)


def _steps_that_fit(cfg: RLConfig, steps_done: int, elapsed_s: float, reserved_s: float = 0.0) -> int:
    """Steps that would still end within max_minutes at the mean step time so far (<= 0: none),
    `elapsed_s` after the first step began, with `reserved_s` of the limit kept for the rest of the
    run (its start-up before the first step, its end after the last). The stopping rule (stop when
    fewer than one fits) and `_horizon` both judge by it."""
    return math.floor((60 * cfg.max_minutes - reserved_s - elapsed_s) / (elapsed_s / steps_done))


def _sync(ray, cfg: RLConfig, trainer, rollout, out: Path, version: int, pause: bool = False) -> float:
    """Push the trainer's weights to every engine; returns the seconds it took. `pause` (async
    mode, the engines generating): the engines pause their requests in flight for the update and
    go on with them after it (partial rollouts), whether or not the update succeeds."""
    t0 = time.perf_counter()
    if pause:
        ray.get(rollout.pause.remote())
    try:
        if cfg.weight_sync == "distributed":
            ray.get(trainer.broadcast_weights.remote(version))
        else:
            path = (out / "weights" / "latest").absolute()  # as the engines, in their own directories, find it
            ray.get(trainer.save_hf.remote(str(path)))
            ray.get(rollout.update_from_disk.remote(str(path), version))
    finally:
        if pause:
            ray.get(rollout.resume.remote())
    return time.perf_counter() - t0
