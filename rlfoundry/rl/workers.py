"""The three workshops as classes, each run as a Ray actor by the loop (`rlfoundry.rl.loop`):

- `TrainerWorker` (training workshop): the policy, its optimizer, the RL loss, checkpoints, and the
  sending side of the weight sync.
- `RolloutWorker` (data workshop): N engine servers behind sglang-router, generation of groups with
  rewards computed as each group finishes (concurrently with the rest of the generation), and
  held-out evaluation.
- `BufferWorker` (central warehouse): the prompt datasets and the SQLite buffer.

They exchange plain Python data (Sample records as dicts), never tensors of the model.
`RolloutWorker` is an asyncio actor: generation requests and reward functions interleave on its loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import torch

from rlfoundry.rl.sample import Sample, Status
from rlfoundry.rollout.launch import freeze_heap

RL_TASK_SEED = 1000
"""RL prompts from task:... sources are drawn with seed RL_TASK_SEED + seed: other draws than the
problems whose worked solutions the model was pre-trained (seed 0) and fine-tuned (seed 1) on by
`rlfoundry pretrain` / `sft` (chance repeats aside); like them, never a held-out question
(`rlfoundry.data.tasks.base.is_held_out`)."""


class _Actor:
    """What every worker of the loop answers besides its own calls."""

    def freeze_heap(self) -> None:
        """`rollout.launch.freeze_heap` in this actor's process."""
        freeze_heap()


def _watched(cmd: list[str]) -> list[str]:
    """`cmd` run under the watchdog: it ends when this process (the actor) ends, however it ends."""
    return [sys.executable, "-m", "rlfoundry.rollout.watchdog", str(os.getpid()), "--", *cmd]


def _threads(sharers: int = 1) -> None:
    # Ray gives actors without CPUs one thread; colocated sync mode uses the whole machine per
    # phase, shared out among the processes working in it at once (data-parallel trainers)
    from rlfoundry.rollout.launch import threads_each

    torch.set_num_threads(threads_each(sharers))


def _computing_at_once(cfg, role: str) -> int:
    """How many processes of this machine compute at once with one of `role` (trainer or engine):
    sync mode's phases take turns (the trainers, then the engines), async mode's run together
    (engines the loop starts on the CPU share it with the trainers)."""
    trainers, engines = cfg.num_trainers, cfg.rollout.num_engines
    together = cfg.mode == "async" and cfg.device == "cpu" and not cfg.rollout.engine_urls
    return trainers + engines if together else (trainers if role == "trainer" else engines)


def _shard(samples: list, rank: int, world: int) -> list:
    """Rank `rank`'s part of a step's (sample, advantage) pairs for `world` data-parallel trainers:
    a contiguous run (groups stay together but at the W - 1 cuts) holding about 1 / world of the
    step's tokens — the samples whose middle token falls in its share of the step's token count."""
    sizes = [len(s.prompt_ids) + len(s.response_ids) for s, _ in samples]
    total, before, part = sum(sizes), 0, []
    for s, n in zip(samples, sizes):
        if total and (before + n / 2) * world // total == rank:
            part.append(s)
        before += n
    return part


def _after_their_groups(part: list, relabelled: list) -> list:
    """The (sample, advantage) pairs with each relabelled one right after the last sample of the
    group it came from (there `pack_prompts` adds it to the group's row: it shares most of its
    prompt), those of groups not in `part` at the end."""
    after: dict[int, list] = {}
    for pair in relabelled:
        after.setdefault(pair[0].group_id, []).append(pair)
    out = []
    for group_id, pairs in itertools.groupby(part, key=lambda pair: pair[0].group_id):
        out += list(pairs) + after.pop(group_id, [])
    return out + [pair for pairs in after.values() for pair in pairs]


def _shortest_first(part: list, share_prompts: bool) -> list:
    """The (sample, advantage) pairs group by group (consecutive samples of one group_id, relabelled
    ones included) from the shortest group to the longest (stable): a micro-batch pads its rows to
    its longest, so rows of about one length waste least (in the demo's steps, a quarter of the
    positions computed were padding in the groups' order). A group's length: its row's with
    `share_prompts` (prompt and responses), else its longest sample's."""
    groups = [list(pairs) for _, pairs in itertools.groupby(part, key=lambda pair: pair[0].group_id)]

    def length(group: list) -> int:
        if share_prompts:
            return len(group[0][0].prompt_ids) + sum(len(s.response_ids) for s, _ in group)
        return max(len(s.tokens) for s, _ in group)
    return [pair for group in sorted(groups, key=length) for pair in group]


# ============================================================================ training workshop
class TrainerWorker(_Actor):
    """One trainer process. With cfg.num_trainers > 1 the loop starts that many, joins them in one
    torch.distributed group (`join_group`) and calls `train` and the checkpoint methods on all of
    them: replicated data parallelism (see `train`). Rank 0 alone sends weights to the engines and
    saves the Hugging Face directory."""

    def __init__(self, cfg, out: str):
        from rlfoundry.model import load_pretrained
        from rlfoundry.model.glm4_moe import ComputeIn
        from rlfoundry.train.trainer import Trainer

        self.rank, self.world = 0, 1
        _threads(_computing_at_once(cfg, "trainer"))
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.cfg, self.out = cfg, Path(out)
        # device cuda: Ray gave this actor one GPU, its cuda:0
        self.device = torch.device(cfg.device)
        self.model = load_pretrained(cfg.model, mtp="auto").to(self.device)
        if cfg.batch_invariant:  # computes as the engines do (they are told too), bit for bit
            self.model.set_batch_invariant()
        if not any(w for _, w in cfg.train.mtp_schedule):
            # no MTP loss in this run: the MTP layer gets no gradient, so it is not trained (nor
            # given optimizer state); the engines keep drafting with it as it is
            for layer in self.model.model.mtp_layers:
                layer.requires_grad_(False)
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.algorithm.kl_coef else None
        self.trainer = Trainer(self.model, cfg.train)
        # What the RL loss calls: the trainer's model (compiled with train.compile), or with `exact`
        # the same fp32 parameters computing in fp64, as the engines do
        self.policy = self.trainer.forward_model
        if cfg.exact:
            self.policy = ComputeIn(self.model, torch.float64)
            if self.ref is not None:
                self.ref = ComputeIn(self.ref, torch.float64)
        # exact and batch-invariant runs: the engines' log-probs are the trainer's bit for bit, so
        # they stand in for the sampling policy's wherever the trainer would compute those again
        # (not in async mode: there the engines may have sampled under older weights)
        self.engine_logprobs_exact = (cfg.exact or cfg.batch_invariant) and cfg.mode == "sync"
        self.tokenizer = self.relabel_fn = None
        if cfg.algorithm.hindsight:  # relabelled prompts are re-tokenized here
            from rlfoundry.data.tokenizer import load_tokenizer
            from rlfoundry.rewards import load_function

            self.tokenizer = load_tokenizer(cfg.model)
            if cfg.algorithm.hindsight_fn:
                self.relabel_fn = load_function(cfg.algorithm.hindsight_fn, "algorithm.hindsight_fn")
        self.sender = None
        if cfg.train.compile:
            self._compile_now()

    def _compile_now(self) -> None:
        """train.compile: compile the RL loss's forward and backward at start-up, on dummy
        micro-batches shaped like a step's (sizes are symbolic, so one graph serves a range of
        shapes) and in the step's precision (train.bf16's autocast is part of the graph), rather
        than inside the first steps. At a full micro-batch and at half, a quarter, ... of it down to
        2 samples: inductor specialises on the token count (its CPU fp32 sum reductions over more
        than 4096 elements use a cascade sum, so N tokens get a guard on N, 2N and 4N > 4096), and
        a step's last micro-batch is often small; halving meets every such range once, and sizes
        in a range already compiled only run. With shared prompts a row holds a group, and dynamo
        specialises a size of 1: the halvings keep at least 2 rows (smaller dummy groups), and one
        more micro-batch of a single group compiles the one-row graph. Weights and optimizer state
        are untouched; the gradients are dropped."""
        from rlfoundry.rl.policy import make_batches, policy_loss, sequence_logprobs

        cfg, r = self.cfg, self.cfg.rollout
        T, K, V = r.max_new_tokens, self.model.config.num_experts_per_tok, self.model.config.vocab_size
        moe_layers = sum(self.model.config.is_moe_layer(i) for i in range(self.model.config.num_hidden_layers))
        routed = [[list(range(K))] * moe_layers] * (8 + T) if r.routing_replay and moe_layers else None
        self.model.train()
        n = max(2, min(cfg.algorithm.micro_batch_size, r.prompts_per_step * r.n_samples_per_prompt))
        sizes = [n]
        while sizes[-1] > 2:
            sizes.append(max(2, sizes[-1] // 2))
        shapes = [(m, min(r.n_samples_per_prompt, m // 2)) for m in sizes]  # (samples, samples a group)
        if cfg.algorithm.share_prompts:
            g = min(r.n_samples_per_prompt, n)
            shapes.append((g, g))  # one group: one packed row
        for n, g in shapes:
            samples = [Sample(prompt_ids=[1] * 7 + [(2 + i // g) % V], response_ids=[1] * (T - i % 2),
                              logprobs=[0.0] * (T - i % 2), routed_experts=routed) for i in range(n)]
            batch = make_batches(samples, [1.0] * n, n, cfg.algorithm.aggregation, routing_replay=r.routing_replay,
                                 share_prompts=cfg.algorithm.share_prompts)[0].to(self.device)
            with self.trainer.autocast(batch.input_ids.device):  # autocast is part of the graph (train.bf16)
                if cfg.algorithm.updates_per_rollout > 1 and not self.engine_logprobs_exact:
                    # the no-grad pass for the later updates' old log-probs: another graph
                    with torch.no_grad():
                        sequence_logprobs(self.policy, batch, r.temperature)
                loss, _ = policy_loss(self.policy, batch, cfg.algorithm, r.temperature)
            loss.backward()
        self.model.zero_grad(set_to_none=True)

    def address(self) -> tuple[str, int]:
        """Where the data-parallel group meets: this node's address and a free port on it."""
        import ray

        from rlfoundry.rollout.launch import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join_group(self, address: str, port: int, rank: int, world: int) -> None:
        """Join the trainers' process group as `rank` of `world`, its backend chosen by where the
        model's tensors are (`device`): gloo for CPU ones, on GPU machines too (NCCL would refuse
        their gradients), NCCL for CUDA ones."""
        import torch.distributed as dist

        from rlfoundry.train.distributed import backend_for

        dist.init_process_group(backend_for(next(self.model.parameters()).device),
                                init_method=f"tcp://{address}:{port}", rank=rank, world_size=world)
        self.rank, self.world = rank, world
        self.trainer.replicated = world > 1

    def step(self) -> int:
        return self.trainer.step

    def train(self, groups: list[list[dict]], horizon: int | None = None, version: int | None = None) -> dict:
        """One RL step (updates_per_rollout optimizer steps) on the groups; returns metrics.
        `horizon`: the optimizer step at which the learning-rate schedule is to end, when the loop
        expects the run to stop before train.total_steps (None: total_steps). `version`: the
        policy version of the weights before this step (the rollouts trained so far); samples
        requested under older weights are off-policy (async mode): their staleness is logged, and
        the train-inference mismatch is measured on the others only.

        Data-parallel (num_trainers > 1): every trainer gets all the groups and computes their
        advantages, then trains on its own part of each update's samples (`_shard`), each
        micro-batch weighted as a share of the whole update; the gradients are summed over the
        trainers before the optimizer step, so that every trainer takes the same step as one
        trainer on all the samples would, up to float rounding. Metrics are over all of them."""
        from rlfoundry.model.parallelize import all_reduce_
        from rlfoundry.rl.algorithms import group_advantages, weight_positive
        from rlfoundry.rl.policy import make_batches, policy_loss, sequence_logprobs, token_means

        cfg, algo = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()
        self.trainer.horizon = horizon
        samples, advs = [], []
        by_size: dict[int, list[list[Sample]]] = {}
        for g in groups:
            by_size.setdefault(len(g), []).append([Sample(**s) for s in g])
        for gs in by_size.values():  # groups of equal size share one advantage computation
            rewards = torch.tensor([[s.reward for s in g] for g in gs])
            a = weight_positive(group_advantages(rewards, algo.advantage), algo.positive_weight)
            for g, row in zip(gs, a.tolist()):
                samples += g
                advs += row
        if not samples:  # no group with a reward signal this step: nothing to train on
            return {"train/skipped": 1.0, "train/samples": 0, "time/train_s": time.perf_counter() - t0}
        temperature = cfg.rollout.temperature
        if version is not None and cfg.mode == "async":
            behind = [version - s.policy_version for s in samples]
            metrics_behind = {"train/staleness_mean": sum(behind) / len(behind), "train/staleness_max": max(behind),
                              "train/stale_frac": sum(b > 0 for b in behind) / len(behind)}
        else:
            version, metrics_behind = None, {}
        n_updates = min(algo.updates_per_rollout, len(samples))
        per_update = -(-len(samples) // n_updates)
        # hindsight: the groups' wrong answers relabelled as right ones, trained in the first update
        relabelled = self._hindsight([g for gs in by_size.values() for g in gs]) if algo.hindsight else []
        metrics: dict = {}
        worst = -1.0  # none measured
        updates = []
        for u in range(n_updates):
            part = list(zip(samples[u * per_update:(u + 1) * per_update], advs[u * per_update:(u + 1) * per_update]))
            if u == 0 and relabelled:
                part = _after_their_groups(part, [(s, algo.hindsight) for s in relabelled])
            part = _shortest_first(part, algo.share_prompts)
            whole = (sum(sum(s.loss_mask) for s, _ in part), len(part))
            if self.world > 1:
                part = _shard(part, self.rank, self.world)
            batches = make_batches([s for s, _ in part], [a for _, a in part], algo.micro_batch_size,
                                   algo.aggregation, routing_replay=cfg.rollout.routing_replay,
                                   share_prompts=algo.share_prompts, of=whole, version=version)
            updates.append([b.to(self.device) for b in batches])
        # Before any update: the log-probs of the policy that generated the samples, the PPO
        # ratios' denominators. The first update is that policy (its own log-probs, ratio 1), so
        # only the later updates' samples need a no-grad pass; in exact and batch-invariant runs
        # the engines' log-probs are these bit for bit and none is needed.
        with torch.no_grad():
            for u, batches in enumerate(updates):
                for b in batches:
                    with self.trainer.autocast(b.input_ids.device):  # as the loss computes (train.bf16)
                        if u > 0 and self.engine_logprobs_exact:
                            b.old_logprobs, b.old_from_engine = b.engine_logprobs[:, 1:], True
                        elif u > 0:
                            b.old_logprobs = sequence_logprobs(self.policy, b, temperature)[0]
                        if self.ref is not None:
                            b.ref_logprobs = sequence_logprobs(self.ref, b, temperature)[0]

        def loss_fn(b):
            nonlocal worst
            loss, m = policy_loss(self.policy, b, algo, temperature)
            worst = max(worst, m.get("mismatch_max", -1.0))
            return loss, m

        counts: dict[str, int] = {}
        for batches in updates:
            m = self.trainer.train_step(batches, loss_fn=loss_fn)
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v if k not in ("step", "tokens") else v
                counts[k] = counts.get(k, 0) + 1
        # means over the updates (the mismatch over those that measured it: the ones whose
        # denominators the trainer computed)
        metrics = token_means({k: v / counts[k] if k not in ("step", "tokens") else v for k, v in metrics.items()})
        worst = float(all_reduce_(torch.tensor(worst, dtype=torch.float64, device=self.device), "max"))  # all trainers
        metrics.pop("mismatch_max", None)
        if worst >= 0:  # (async mode: none when every sample is off-policy)
            metrics["mismatch_max"] = worst
        out = {f"train/{k}": v for k, v in metrics.items() if k != "step"}
        out.update(metrics_behind)
        out["train/samples"] = len(samples)
        if algo.hindsight:
            out["train/hindsight_samples"] = len(relabelled)
        out["time/train_s"] = time.perf_counter() - t0
        return out

    def _hindsight(self, groups: list[list[Sample]]) -> list[Sample]:
        """algorithm.hindsight's samples: wrong answers of the groups relabelled as right answers to
        the problems they do solve, by the relabel function (algorithm.hindsight_fn, else the
        built-in task named in the sample's metadata: `Task.hindsight`), at most
        algorithm.hindsight_per_group distinct problems a group and none of the held-out ones
        (`is_held_out`). The relabelled prompt is the sample's own prompt with its question
        (metadata["question"]) replaced by the new one; samples without it are passed over. The
        response is kept token for token; `Sample.relabelled_from` records the problem it came from."""
        from rlfoundry.data.tasks import TASKS
        from rlfoundry.data.tasks.base import is_held_out

        out = []
        for g in groups:
            seen: set[str] = set()
            for s in g:
                if len(seen) >= self.cfg.algorithm.hindsight_per_group:
                    break
                question = s.metadata.get("question")
                task = TASKS.get(s.metadata.get("task", ""))
                relabel = self.relabel_fn or (task.hindsight if task is not None else None)
                if relabel is None or not isinstance(question, str) or (s.reward or 0) > 0 \
                        or s.status != Status.COMPLETED:
                    continue
                meta = relabel(s.text, s.metadata)
                if meta is None or meta["question"] in seen or is_held_out(meta["question"]):
                    continue
                prompt = self.tokenizer.decode(s.prompt_ids)
                if question not in prompt:
                    continue
                seen.add(meta["question"])
                ids = self.tokenizer.encode(prompt.replace(question, meta["question"]), add_special_tokens=False)
                R = len(s.response_ids)
                out.append(Sample(prompt_ids=ids, response_ids=list(s.response_ids), logprobs=[0.0] * R,
                                  loss_mask=list(s.loss_mask), reward=1.0, status=Status.COMPLETED,
                                  policy_version=s.policy_version, group_id=s.group_id, index=s.index,
                                  prompt_index=s.prompt_index, text=s.text,
                                  metadata=meta, relabelled_from={"question": question, "label": s.label}))
        return out

    # ------------------------------------------------------------------ weights
    def connect_engines(self, engine_urls: list[str]) -> None:
        """Join the engines in a torch.distributed group for broadcast weight updates, over gloo:
        CPU tensors (a CUDA trainer's weights are copied out first, and the engines copy them onto
        their GPUs). Not NCCL: it takes one rank per GPU, and colocated engines share the
        trainers' GPUs."""
        from rlfoundry.rollout.client import DistributedWeightSender, SGLangClient
        from rlfoundry.rollout.launch import free_port

        import ray

        # engines on other machines (rollout.engine_urls) connect to this one by its address
        local = all(urllib.parse.urlsplit(u).hostname in ("127.0.0.1", "localhost", "::1") for u in engine_urls)
        address = "127.0.0.1" if local else ray.util.get_node_ip_address()
        self.sender = DistributedWeightSender([SGLangClient(u) for u in engine_urls], address, free_port(),
                                              backend="gloo")

    def broadcast_weights(self, version: int) -> float:
        from rlfoundry.model.hf_io import to_hf_state_dict

        t0 = time.perf_counter()
        self.sender.send(list(to_hf_state_dict(self.model, fused_experts=True)), version=str(version))
        return time.perf_counter() - t0

    def save_hf(self, path: str) -> str:
        from rlfoundry.data.tokenizer import load_tokenizer
        from rlfoundry.model import save_pretrained

        save_pretrained(self.model, path)
        tok = load_tokenizer(self.cfg.model)
        if tok is not None:
            tok.save_pretrained(str(path))
        return str(path)

    def save_checkpoint(self, path: str, extra: dict) -> None:
        from rlfoundry.train.checkpoint import save_checkpoint

        save_checkpoint(self.trainer, path, extra=extra)

    def load_checkpoint(self, path: str) -> dict:
        from rlfoundry.train.checkpoint import load_checkpoint

        return load_checkpoint(self.trainer, path)

    def weights_digest(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


# ============================================================================ data workshop
class RolloutWorker(_Actor):
    def __init__(self, cfg, out: str, visible_gpus: str | None = None):
        """Starts rollout.num_engines engine servers of rollout.backend's kind (or finds them at
        rollout.engine_urls) and, for SGLang-protocol engines, sglang-router in front of them.
        `visible_gpus`: with device cuda, the CUDA_VISIBLE_DEVICES the engines get (the value the
        run was started with on this machine; None: all the node's GPUs; "ray": the GPUs Ray gave
        this actor, async mode's engines' own)."""
        from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer
        from rlfoundry.rewards import RewardContext, load_function, load_reward
        from rlfoundry.rl.generate import GenerateContext
        from rlfoundry.rollout.client import RoundRobinClient, SGLangClient
        from rlfoundry.rollout.launch import BACKENDS, free_port, wait_healthy

        self.cfg, self.out = cfg, Path(out)
        r = cfg.rollout
        self.tokenizer = load_tokenizer(cfg.model)
        self.eos = eos_token_ids(self.tokenizer)
        self.reward_fn = load_reward(cfg.reward.fn)
        self.reward_ctx = RewardContext(remote_url=cfg.reward.remote_url, timeout_s=cfg.reward.timeout_s,
                                        extra=cfg.reward.extra)
        backend = BACKENDS[r.backend](r.engine_args)
        self.procs: list[subprocess.Popen] = []
        self.log = open(self.out / "engines.log", "ab")
        if r.engine_urls:  # someone else's engines: wait for them as for our own
            self.engine_urls = [u.rstrip("/") for u in r.engine_urls]
            for i, url in enumerate(self.engine_urls):
                try:
                    wait_healthy(url + "/health", 300)
                except TimeoutError as e:
                    raise RuntimeError(f"rollout.engine_urls[{i}]: {e}") from None
            served_name = None
        else:
            self.engine_urls = self._start_engines(backend, visible_gpus)
            served_name = cfg.model
        self.engines = [backend.client(u, served_name) for u in self.engine_urls]
        self._check_engines()
        if backend.supports_router:
            port = free_port()
            self.procs.append(subprocess.Popen(_watched(
                [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                 "--worker-urls", *self.engine_urls, "--policy", "round_robin", "--log-level", "warn",
                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]),
                stdout=self.log, stderr=self.log))
            self.router_url = f"http://127.0.0.1:{port}"
            wait_healthy(self.router_url + "/health", 120, self.procs)
            self.client = SGLangClient(self.router_url)
        else:
            self.client = RoundRobinClient(self.engines)
        # HTTP calls block: one thread per request in flight (asyncio's default pool is too small),
        # up to one a sequence (a custom generate function's calls, evaluation's requests)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=r.concurrency * r.n_samples_per_prompt)
        self.ctx = GenerateContext(self.client, self.tokenizer, self.eos, self.pool)
        self.generate_fn = load_function(r.generate_fn, "generate_fn") if r.generate_fn else None
        # what each engine runs with, for the record (threads, batch, context)
        info = [{"url": u, **{k: e.server_info().get(k) for k in ("torch_threads", "max_running_requests",
                                                                  "context_length", "weight_version")}}
                for u, e in zip(self.engine_urls, self.engines)]
        (self.out / "engines.json").write_text(json.dumps(info, indent=1) + "\n")

    def _start_engines(self, backend, visible_gpus: str | None) -> list[str]:
        """rollout.num_engines servers on free ports of this machine, each under the watchdog (they
        end with this actor), sharing out its cores; returns their URLs once all are healthy."""
        from rlfoundry.rollout.launch import EngineSpec, engine_device, free_port, threads_each, wait_healthy

        cfg, r = self.cfg, self.cfg.rollout
        threads = r.engine_threads or threads_each(_computing_at_once(cfg, "engine"))
        if cfg.device == "cuda" and visible_gpus != "ray":
            # Ray hides the GPUs from actors that asked for none, as this one in sync mode: its
            # engines see the node's GPUs (or those the run was started with) and spread over them
            if visible_gpus is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
        urls = []
        for i in range(r.num_engines):
            port = free_port()
            # deterministic mode sends one group at a time: no burst to wait for
            spec = EngineSpec(cfg.model, max_batch=r.max_batch, max_len=r.max_len or None,
                              dtype="float64" if cfg.exact else "float32", compile_decode=r.compile_decode,
                              admit_quiet_ms=0.0 if cfg.deterministic else None, batch_invariant=cfg.batch_invariant,
                              device=engine_device(cfg.device, i))
            cmd, env = backend.engine_command(spec, port)
            self.procs.append(subprocess.Popen(_watched(cmd), env={**os.environ, **env,
                                                                   **backend.thread_env(i, threads)},
                                               stdout=self.log, stderr=self.log))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_healthy(url + "/health", 600, self.procs)
        return urls

    def _check_engines(self) -> None:
        """Engines found at rollout.engine_urls must run the modes the run needs (ours report them;
        a server that does not is taken to run none)."""
        for i, e in enumerate(self.engines if self.cfg.rollout.engine_urls else []):
            info = e.server_info()
            if self.cfg.batch_invariant and info.get("batch_invariant") is not True:
                raise RuntimeError(f"rollout.engine_urls[{i}]: {e.url} is not batch-invariant, which "
                                   "batch_invariant: true needs (rlfoundry serve --batch-invariant)")
            if self.cfg.exact and info.get("dtype") != "float64":
                raise RuntimeError(f"rollout.engine_urls[{i}]: {e.url} computes in {info.get('dtype')}, "
                                   "exact: true needs float64 (rlfoundry serve --dtype float64)")

    def urls(self) -> list[str]:
        return self.engine_urls

    def shutdown(self) -> None:
        self.log.close()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    async def pause(self) -> None:
        """Async mode, before a weight update: the engines stop generating between two decode steps,
        their requests in flight kept with their caches (engines that cannot pause go on)."""
        await asyncio.gather(*(asyncio.to_thread(e.pause) for e in self.engines if hasattr(e, "pause")))

    async def resume(self) -> None:
        """After the update: the paused requests go on under the new weights (partial rollouts)."""
        await asyncio.gather(*(asyncio.to_thread(e.resume) for e in self.engines if hasattr(e, "resume")))

    async def update_from_disk(self, path: str, version: int) -> float:
        """Every engine loads the weights at `path` (in async mode while it generates: each pauses
        its requests in flight for the update, between two decode steps, and goes on with them)."""
        t0 = time.perf_counter()
        # (threads of their own: the generation's pool may be busy with the requests in flight)
        await asyncio.gather(*(asyncio.to_thread(e.update_weights_from_disk, path, version=str(version))
                               for e in self.engines))
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ generation
    def _samples(self, req: dict, gens: list) -> list[Sample]:
        """A group's samples from its request and the engine's generations."""
        from rlfoundry.rl.generate import finish_status

        base = self._base(req)
        return [Sample(**base, index=i, response_ids=g.output_ids, logprobs=g.logprobs,
                       status=finish_status(g.finish_reason), routed_experts=g.routed_experts,
                       last_policy_version=int(g.weight_version) if str(g.weight_version).isdigit() else None,
                       text=self.tokenizer.decode(g.output_ids, skip_special_tokens=True))
                for i, g in enumerate(gens)]

    @staticmethod
    def _base(req: dict) -> dict:
        return dict(prompt_ids=req["prompt_ids"], group_id=req["group_id"], prompt_index=req["prompt_idx"],
                    label=req["label"], metadata=req["metadata"], policy_version=req["version"])

    def _failed(self, req: dict, n: int, error: Exception) -> list[Sample]:
        """A group whose generation failed: kept as failed (not scored), the run goes on."""
        base = self._base(req) | {"metadata": req["metadata"] | {"error": str(error)}}
        return [Sample(**base, index=i, status=Status.FAILED) for i in range(n)]

    async def _scored(self, samples: list[Sample], score: bool) -> list[dict]:
        from rlfoundry.rewards import score_samples

        if score:
            overlong = (self.cfg.rollout.max_new_tokens, self.cfg.reward.overlong_cache) \
                if self.cfg.reward.overlong_cache else None
            await score_samples(self.reward_fn, self.reward_ctx, samples, self.cfg.reward.format_penalty, overlong)
        return [s.to_dict() for s in samples]

    async def _group(self, req: dict, sem: asyncio.Semaphore, params: dict) -> list[dict]:
        """A custom generate function's group: one call a sample."""
        async with sem:
            try:
                samples = await self._generate_fn_group(req, params)
            except Exception as e:  # noqa: BLE001 - the group is kept as failed, the run goes on
                return await self._scored(self._failed(req, params["n"], e), False)
        return await self._scored(samples, True)

    async def _generate_fn_group(self, req: dict, params: dict) -> list[Sample]:
        sampling = {k: v for k, v in params.items() if k != "n"}
        outs = await asyncio.gather(*(self.generate_fn(self.ctx, Sample(**self._base(req), index=i),
                                                       sampling | {"seed": req["seed"] + i})
                                      for i in range(params["n"])))
        samples = [s for o in outs for s in (o if isinstance(o, list) else [o])]
        for i, s in enumerate(samples):
            s.index = i
        return samples

    async def _engine_share(self, engine, reqs: list[dict], per_request: int, params: dict) -> list[list[dict]]:
        """One engine's share of the groups: batched requests of `per_request` groups, one at a
        time; each batch's groups are scored while the engine generates the next."""
        scoring = []
        for k in range(0, len(reqs), per_request):
            batch = reqs[k:k + per_request]
            call = functools.partial(engine.generate_batch, [q["prompt_ids"] for q in batch],
                                     [q["seed"] for q in batch], **params)
            try:
                gens = await asyncio.get_running_loop().run_in_executor(self.pool, call)
                groups = [(self._samples(q, g), True) for q, g in zip(batch, gens)]
            except Exception as e:  # noqa: BLE001 - the groups are kept as failed, the run goes on
                groups = [(self._failed(q, params["n"], e), False) for q in batch]
            scoring += [asyncio.create_task(self._scored(samples, score)) for samples, score in groups]
        return list(await asyncio.gather(*scoring))

    async def generate(self, requests: list[dict], greedy: bool = False, n: int | None = None) -> list[list[dict]]:
        """Groups of samples (as dicts) with rewards, one per request {group_id, prompt_idx, prompt_ids,
        label, metadata, seed, version}, in the requests' order.

        Without a custom generate function the groups go to the engines directly, not through the
        router: engine j takes every num_engines-th group from the j-th on, as batched
        `/generate` requests (`RolloutClient.generate_batch`: every prompt its seed, which
        sglang-router cannot pass on: it takes one sampling_params for a whole batch) of at most
        concurrency x n_samples_per_prompt / num_engines sequences, one at a time an engine. One
        request of ~30 groups against ~30 of one group, decoded together all the same: the demo's
        rollout rounds in 0.87x the time (`benchmarks/bench_rollout_requests.py`), for the
        engine server parsing and answering every request on the interpreter that decodes. Where
        each engine computes every sequence as if alone (batch_invariant), which groups share a
        request changes no bit. A custom generate function's calls go through the router, up to
        concurrency groups at a time."""
        r = self.cfg.rollout
        params = dict(max_new_tokens=r.max_new_tokens, temperature=0.0 if greedy else r.temperature,
                      top_p=1.0 if greedy else r.top_p, n=n or r.n_samples_per_prompt, stop_token_ids=self.eos)
        # prompts in flight: as many sequences as concurrency groups of n_samples_per_prompt
        in_flight = r.concurrency * r.n_samples_per_prompt // params["n"]
        if self.generate_fn is not None:
            sem = asyncio.Semaphore(1 if self.cfg.deterministic else max(1, in_flight))
            return list(await asyncio.gather(*(self._group(q, sem, params) for q in requests)))
        if r.routing_replay and not greedy:
            params["return_routed_experts"] = True
        E = len(self.engines)
        # deterministic mode: one group a request, so that what an engine decodes together never
        # depends on when a batch's prompts were admitted (its engines start at once, unbatched)
        per_request = 1 if self.cfg.deterministic else max(1, in_flight // E)
        parts = await asyncio.gather(*(self._engine_share(e, requests[j::E], per_request, params)
                                       for j, e in enumerate(self.engines)))
        groups: list = [None] * len(requests)
        for j, part in enumerate(parts):
            groups[j::E] = part
        return groups


# ============================================================================ central warehouse
class BufferWorker(_Actor):
    def __init__(self, cfg, out: str, db_path: str | None = None):
        from rlfoundry.buffer import Buffer, PromptDataset
        from rlfoundry.data.datasets import DataStats
        from rlfoundry.data.tokenizer import load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.stats = DataStats()
        d = cfg.data
        self.stages = [PromptDataset.load(st.source, prompt_key=d.prompt_key, label_key=d.label_key,
                                          metadata_key=d.metadata_key, n_per_level=d.n_per_level,
                                          seed=RL_TASK_SEED + cfg.seed,
                                          skip_bad=d.skip_bad_rows, stats=self.stats) for st in d.curriculum]
        self.buffer = Buffer(db_path or Path(out) / "buffer.sqlite", seed=cfg.seed)

    def stage_at(self, step: int) -> int:
        left = step
        for i, st in enumerate(self.cfg.data.curriculum):
            if st.steps == 0 or left < st.steps:
                return i
            left -= st.steps
        return len(self.cfg.data.curriculum) - 1

    def requests(self, step: int, version: int) -> list[dict]:
        """The generation requests now due for rollout `step`, empty when the rollout is complete:
        its groups still pending (after a kill), new prompts from the curriculum stage of the step
        when none were drawn yet, or else a refill round.

        The refill is DAPO's dynamic sampling (Yu et al. 2025, section 3.2): new prompts in place of
        the filtered groups, while fewer than prompts_per_step are kept and fewer than
        algorithm.refill_rounds extra draws were made. Everything here is a function of the
        database, so a resumed run continues exactly as the uninterrupted one. Deviation: DAPO
        over-generates in fixed-size batches and drops the surplus; this draws exactly the number
        missing, or with algorithm.oversample that number over the recent fraction kept, and trains
        every kept group."""
        if not self.buffer.has_rollout(step):
            return self._draw(step, self._draw_size(step, self.cfg.rollout.prompts_per_step), version)
        self.buffer.reset_pending(step)
        pending = self.buffer.pending(step)
        if pending:
            return self._requests(step, pending, version)
        missing = self.cfg.rollout.prompts_per_step - self.buffer.count_groups(step, ("generated", "trained"))
        drawn = max(self.buffer.draws(step), 1)  # runs from before draws were counted: one draw
        if missing <= 0 or drawn > self.cfg.algorithm.refill_rounds:
            return []
        return self._draw(step, self._draw_size(step, missing), version)

    def _draw_size(self, step: int, missing: int) -> int:
        """Prompts to draw for `missing` groups of rollout `step`: `missing`, or with
        algorithm.oversample as many as the last 4 steps' fraction of groups kept predicts for it
        (at most 4 times as many), times algorithm.oversample_margin."""
        a = self.cfg.algorithm
        if not a.oversample:
            return missing
        recent = range(max(0, step - 4), step)
        drawn = sum(self.buffer.count_groups(s, ("generated", "trained", "filtered")) for s in recent)
        kept = sum(self.buffer.count_groups(s, ("generated", "trained")) for s in recent)
        expected = missing if not drawn else min(4 * missing, missing * drawn / max(kept, 1))
        return math.ceil(expected * a.oversample_margin)

    def _draw(self, step: int, n: int, version: int) -> list[dict]:
        stage = self.stage_at(step)
        drawn = self.buffer.draw(step, f"stage{stage}", len(self.stages[stage]), n, self.cfg.data.skip_solved,
                                 self.cfg.data.skip_unsolved)
        return self._requests(step, drawn, version)

    def _requests(self, step: int, drawn: list[tuple[int, int]], version: int) -> list[dict]:
        from rlfoundry.buffer.buffer import hash_seed

        ds = self.stages[self.stage_at(step)]
        return [{"group_id": gid, "prompt_idx": idx, "prompt_ids": ds.token_ids(idx, self.tokenizer,
                                                                              self.cfg.data.apply_chat_template),
                 "label": ds[idx].label, "metadata": ds[idx].metadata,
                 "seed": hash_seed(self.cfg.seed, step, idx) % (2 ** 31), "version": version} for gid, idx in drawn]

    def put(self, groups: list[list[dict]]) -> None:
        """Store generated groups; filter failed ones and (when configured) zero-variance ones."""
        items = []
        for g in groups:
            samples = [Sample(**s) for s in g]
            reason = None
            if any(s.status == Status.FAILED for s in samples):
                reason = "failed"
            elif self.cfg.algorithm.filter_zero_variance and len({s.reward for s in samples}) == 1:
                reason = "zero_variance"
            items.append((samples[0].group_id, samples, reason))
        self.buffer.put_many(items)  # one transaction for the round

    def eval_requests(self) -> dict[str, list[dict]]:
        """Held-out prompt sets: task:... sets drawn from the task's held-out questions with seed
        HELD_OUT_SEED + seed, as `rlfoundry eval` does (training prompts never hold them); files are
        used as they are (first eval_n rows)."""
        from rlfoundry.buffer import PromptDataset
        from rlfoundry.data.tasks.base import HELD_OUT_SEED

        d, out = self.cfg.data, {}
        for source in self.cfg.eval_sources:
            ds = PromptDataset.load(source, prompt_key=d.prompt_key, label_key=d.label_key,
                                    metadata_key=d.metadata_key, n_per_level=self.cfg.eval_n,
                                    seed=HELD_OUT_SEED + self.cfg.seed, held_out=True)
            out[source] = [{"group_id": -1, "prompt_idx": i, "prompt_ids": ds.token_ids(i, self.tokenizer,
                                                                                       d.apply_chat_template),
                            "label": ds[i].label, "metadata": ds[i].metadata, "seed": i, "version": -1}
                           for i in range(min(len(ds), self.cfg.eval_n))]
        return out

    def training_groups(self, step: int, min_version: int | None = None) -> list[list[dict]]:
        """The groups of rollout `step` to train; with `min_version` (async mode), those with a
        sample requested under an older policy version are filtered as stale instead."""
        groups = self.buffer.group_dicts(step)  # (as stored: no Sample built and taken apart again)
        if min_version is not None:
            stale = {g[0]["group_id"] for g in groups if min(s["policy_version"] for s in g) < min_version}
            if stale:
                self.buffer.filter_groups(sorted(stale), "stale")
                groups = [g for g in groups if g[0]["group_id"] not in stale]
        return groups

    def step_stats(self, step: int, save_to: str | None = None) -> dict:
        """Group counts of rollout `step`, and reward and length statistics of every stored sample
        (filtered ones included); with `save_to`, also write them as JSONL there."""
        states = ("generated", "filtered", "trained")
        if save_to:
            Path(save_to).parent.mkdir(parents=True, exist_ok=True)
            with open(save_to, "w") as f:
                f.writelines(s.to_json() + "\n" for g in self.buffer.groups(step, states) for s in g)
        counts = {"groups_kept": self.buffer.count_groups(step, ("generated", "trained")),
                  "groups_filtered": self.buffer.count_groups(step, ("filtered",)),
                  "rollout/refill_rounds": max(self.buffer.draws(step) - 1, 0),
                  "rollout/prompts_skipped": self.buffer.skipped(step)}
        stats = self.buffer.sample_stats(step, states)  # (reward, status, correct, response length)
        rewards = [r for r, _, _, _ in stats if r is not None]
        if not rewards:
            return counts
        n = len(stats)
        return {**counts,
                "reward/mean": sum(rewards) / len(rewards),
                "reward/accuracy": sum(c for _, _, c, _ in stats) / n,
                "response/length_mean": sum(length for _, _, _, length in stats) / n,
                "response/truncated_frac": sum(st == Status.TRUNCATED.value for _, st, _, _ in stats) / n}

    def mark_trained(self, step: int, train_step: int) -> int:
        return self.buffer.mark_trained(step, train_step)

    def rollback(self, train_step: int) -> int:
        return self.buffer.rollback(train_step)

    def counts(self) -> dict:
        return self.buffer.counts()
