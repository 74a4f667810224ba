"""The typed configuration of `rlfoundry rl` (YAML + key=value overrides), validated before anything
starts: unknown keys, wrong types, missing model or data and incompatible options name the field."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from rlfoundry.model.config import ModelConfig
from rlfoundry.rl.algorithms import ADVANTAGES, AGGREGATIONS, KL_KINDS
from rlfoundry.train.stages import ConfigError, build_config, read_config_values
from rlfoundry.train.trainer import TrainConfig

DEFAULT_MODEL = str(Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model")


@dataclass
class CurriculumStage:
    source: str
    """Prompt source: a JSONL/Parquet file, a datasets directory, or task:NAME:LEVELS."""
    steps: int = 0
    """Rollout steps spent in this stage (0 in the last stage: until the end)."""


@dataclass
class DataConfig:
    curriculum: list = field(default_factory=lambda: [{"source": "task:countdown:2,3", "steps": 0}])
    """Stages of prompts, easiest first ({source, steps}); GLM-4.5's RL uses two difficulty stages."""
    prompt_key: str = "prompt"
    """Key of the prompt (a string or a list of messages) in each record."""
    label_key: str = "label"
    """Key of the reference answer."""
    metadata_key: str = "metadata"
    """Key of the per-prompt metadata object."""
    apply_chat_template: bool = True
    """Wrap string prompts as a user message and apply the tokenizer's chat template."""
    n_per_level: int = 2000
    """Problems per level for task:... sources."""
    skip_bad_rows: bool = False
    """Skip (and count) invalid prompt rows instead of stopping at the first."""
    skip_solved: float = 0.0
    """Probability of passing over a drawn prompt whose latest group was all correct (no GRPO
    signal; it waits for its next epoch). See Buffer.draw."""
    skip_unsolved: float = 0.0
    """Probability of passing over a drawn prompt whose latest group was all wrong."""


@dataclass
class RolloutConfig:
    backend: str = "rlfoundry"
    """The engine servers: rlfoundry (ours; SGLang's protocol, behind sglang-router) or vllm
    (vLLM's OpenAI server, `make vllm` here; the groups dealt out to the engines in turn; weights
    from disk only). The servers are started by the loop, or found at rollout.engine_urls."""
    engine_urls: list = field(default_factory=list)
    """Engine servers already running (http://host:port each, of rollout.backend's kind: ours or
    SGLang's for rlfoundry), used instead of starting num_engines of them. weight_sync distributed
    needs them to reach this machine; disk needs the run directory at the same path on theirs."""
    engine_args: list = field(default_factory=list)
    """Extra command-line arguments of every engine server the loop starts (e.g. vLLM's
    ["--enforce-eager"])."""
    num_engines: int = 1
    """Inference engines the loop starts (behind sglang-router for the rlfoundry backend)."""
    engine_threads: int = 0
    """Torch (OpenMP) threads of each engine server; 0: the machine's cores shared out among the
    engines (at least one each), so that engines generating at once never run more threads than
    cores. (Like max_batch, max_len and compile_decode: for the engines the loop starts; those at
    engine_urls run as they were started.)"""
    prompts_per_step: int = 32
    """Prompts per rollout step."""
    n_samples_per_prompt: int = 8
    """Group size (GRPO's G)."""
    max_new_tokens: int = 96
    """Response length limit."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_batch: int = 256
    """Sequences an engine decodes at once."""
    max_len: int = 0
    """Each engine's context in tokens, prompt and response together: its KV cache holds max_batch
    sequences of this many positions (and the MTP layer's cache as many). 0: the model's
    max_position_embeddings (the shipped model: 2048, a 2.7 GB cache at max_batch 512, where the
    demo's sequences stay under 100 tokens), also the most it may be. A response stops at the
    context's end (truncated); a prompt that fills it fails its group."""
    concurrency: int = 64
    """Groups in flight to the engines: concurrency x n_samples_per_prompt sequences, shared out
    among the engines, each its part in one batched request at a time (a custom generate_fn: as
    many sequences' worth of its calls through the router). Requests of fewer samples each are let
    in as many sequences' worth (evaluation's, one greedy sample a prompt: 512 at once, where 64 at
    a time left each engine decoding 32 and took twice as long)."""
    generate_fn: str = ""
    """A custom async generate function by dotted path (see rlfoundry.rl.generate); empty: the
    groups in batched requests to the engines (`RolloutWorker.generate`)."""
    routing_replay: bool = False
    """Train with the experts the engine chose for each token (rollout routing replay)."""
    compile_decode: bool = False
    """Engines decode through torch.compile (faster steps; each engine compiles at start-up for a
    minute or two; log-probs still within float rounding of the trainer's)."""


@dataclass
class RewardConfig:
    fn: str = "task"
    """Built-in reward (task, exact_match, math, code, remote) or a dotted path to an async function."""
    format_penalty: float = 0.0
    """Added (<= 0) when the response has no <answer>...</answer>."""
    overlong_cache: int = 0
    """DAPO overlong penalty: ramps to -1 over the last overlong_cache tokens before max_new_tokens (0: off)."""
    remote_url: str = ""
    """Reward model URL for fn: remote."""
    timeout_s: float = 10.0
    """Limit of one math check, code run or remote call."""
    extra: dict = field(default_factory=dict)
    """Passed to custom reward functions as ctx.extra."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """grpo, dr_grpo, rloo, reinforce++ or reinforce++_baseline."""
    positive_weight: float = 1.0
    """Weight on the positive advantages, the negative ones unchanged (Zhu et al. 2025's weighted
    positive and negative reinforcement, `weight_positive` in rlfoundry/rl/algorithms.py): above 1
    favours the right answers the policy samples (pass@1), below 1 keeps its diversity (pass@k)."""
    policy_loss: str = "ppo"
    """ppo (token ratios, clip-higher, optional dual clip) or gspo (sequence ratios)."""
    eps_low: float = 0.2
    """Lower clip range (GSPO's paper: 3e-4)."""
    eps_high: float = 0.28
    """Upper clip range, clip-higher (DAPO 0.28; GSPO's paper: 4e-4)."""
    dual_clip: float = 0.0
    """Dual-clip constant c > 1 (0: off)."""
    aggregation: str = "token-mean"
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm."""
    kl_coef: float = 0.0
    """KL penalty against the reference (initial) model; 0 as in GLM-4.5's RL."""
    kl_kind: str = "k3"
    """k1, k2 or k3."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    tis_cap: float = 0.0
    """Truncated importance sampling cap C on trainer/engine probability ratios (0: off)."""
    filter_zero_variance: bool = True
    """Leave out groups whose rewards are all equal (no signal; DAPO's dynamic sampling filter)."""
    refill_rounds: int = 0
    """DAPO's dynamic sampling refill: while fewer than rollout.prompts_per_step groups of a step are
    kept, draw new prompts for the missing ones and generate them, at most this many extra rounds
    (0: train on the groups kept)."""
    oversample: bool = False
    """Each draw of a step is the number of groups still missing (at first
    rollout.prompts_per_step) divided by the fraction of groups kept over the last 4 steps (at most
    4 times as many), so that one round of generation usually yields the step's groups where two
    or three rounds of ever fewer prompts would (each round costs a decode as long as its longest
    response; rollout.max_batch should hold a round); with refill_rounds 0, the one round comes
    near prompts_per_step kept groups instead of short of them. Every kept group is trained, so a
    step may train more than prompts_per_step groups."""
    oversample_margin: float = 1.0
    """With oversample, each draw is this many times what the recent fraction kept predicts (at
    least 1): with 1 a round falls short about every other step and a refill round follows, whose
    few prompts cost a decode as long as a full round's (~0.09 s against ~0.3 s for ~60 groups in
    the demo); drawn a little more, the first round usually suffices and its surplus is trained."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout: the step's samples split into this many mini-batches, each one
    optimizer step; > 1 makes the later ones off-policy (PPO ratios against the sampling policy,
    clipped). Their ratios' denominators come from a no-grad pass of the trainer over their samples
    before the first update (about a third more training time for them), or, with exact or
    batch_invariant, from the engines' log-probs, which equal them bit for bit (no pass)."""
    hindsight: float = 0.0
    """Hindsight relabelling (0: off): each wrong answer of a trained group that its task can
    relabel — as the right answer to the problem it does solve (`Task.hindsight`; Countdown: the
    same numbers, the value the answer reaches as the target) — joins the step's first update as
    one more sample with this advantage, its ratio taken against the trainer's own log-probs
    (ratio 1: the gradient of this weight times its log-likelihood), in the step's aggregation.
    Hindsight Experience Replay (Andrychowicz et al., 2017) for goal-conditioned problems, trained
    by likelihood as in goal-conditioned supervised learning (Ghosh et al., 2021, "Learning to
    Reach Goals via Iterated Supervised Learning"). Deviations: only groups that are trained
    (kept) give answers; the relabelled prompt is the sample's prompt with its metadata's
    "question" replaced, so prompts without one give none; relabelled problems that are held
    out are left out."""
    hindsight_per_group: int = 2
    """At most this many relabelled answers a group, each a different problem."""
    hindsight_fn: str = ""
    """Relabel function by dotted path, `relabel(response: str, metadata: dict) -> dict | None`
    returning the new problem's metadata with its "question" (or None), as `Task.hindsight`;
    empty: the built-in task named by the sample's metadata["task"]."""
    micro_batch_size: int = 32
    """Samples per forward/backward."""
    share_prompts: bool = True
    """Compute each group's prompt once per micro-batch: its samples' responses are packed after it
    in one row, each attending to the prompt and itself (see rlfoundry/rl/policy.py). Same loss and
    gradients up to float rounding; n - 1 fewer prompt copies through the model, but a row's
    attention grows to (prompt + all responses)^2: turn it off for long responses."""


@dataclass
class RLConfig:
    model: str = DEFAULT_MODEL
    """Hugging Face checkpoint directory of the policy (default: the shipped tiny model)."""
    steps: int = 30
    """Rollout steps."""
    max_minutes: float = 0.0
    """End the run within this many minutes of its start (`run_rl`'s: Ray, the engines and trainers
    starting up included): after each step the loop stops, with a final evaluation and checkpoint,
    when one more step and then the end of the run would pass the limit — a step judged by the
    mean step time so far, the end by the last evaluation's and checkpoint's times and
    SHUTDOWN_RESERVE_S (rlfoundry/rl/loop.py). 0: no limit. The number of steps then depends on the
    machine's speed, and so does the learning-rate schedule: it ends (reaches train.final_lr) at
    the last step expected to fit, when that comes before train.total_steps. A resumed run
    (`--resume`) counts from its own start and continues towards `steps`."""
    seed: int = 0
    """Seed of prompt order, sampling and training."""
    deterministic: bool = False
    """Bit-reproducible runs: deterministic torch algorithms and per-request sampling seeds."""
    exact: bool = False
    """Exact on-policy log-probs: the trainer and the engines compute in fp64 from the same fp32
    weights (weights, optimizer state, checkpoints and the weight sync stay fp32) and round log-probs
    to fp32, so the trainer's log-probs of the rollout tokens equal the engines' (mismatch 0). In
    fp32 they differ by up to ~1e-5: CPU matrix products round differently for different row counts
    (MKL picks kernels by shape), and decoding and training batch the same tokens differently.
    Costs ~1.3x the rollout and ~3x the training time of fp32 here (the demo: 4.6 vs 2.5 min).
    Combines with train.compile and rollout.compile_decode (compiled and eager fp64 agree to ~1e-14)."""
    batch_invariant: bool = False
    """Exact on-policy log-probs in fp32: the engines and the trainer compute every sequence as if it
    were alone (`Glm4MoeForCausalLM.set_batch_invariant`: products, attention, norms and the
    experts' sums by native kernels of our own in which every output is a fixed sequence of
    operations on its own row's inputs; where they cannot be built, MKL's products over padded rows),
    so the trainer's log-probs equal the engines' bit for bit (mismatch 0) with fp32 arithmetic
    throughout. It also makes runs bit-reproducible with requests concurrent (batching no longer
    changes a bit; `deterministic` serialises them instead), up to max_minutes' clock. With the
    kernels it is faster than plain fp32 here (`benchmarks/bench_batch_invariant.py`: generation
    ~0.9x, the RL loss ~0.75-0.95x). Eager only (not with train.compile or rollout.compile_decode),
    fp32 only (not with exact or train.bf16)."""
    num_trainers: int = 1
    """Data-parallel trainer processes (Ray actors in one torch.distributed group, over gloo: the
    RL trainer computes on CPU). Each holds the whole model and optimizer and trains on about 1 / num_trainers
    of every step's tokens; their gradients are summed before each optimizer step, which is then the
    same on all of them and the same as one trainer's on all the samples, up to float rounding.
    The cores are shared out among them (on one machine, each trainer one core of two)."""
    device: str = "cpu"
    """Where the trainers and the engines compute: cpu, or cuda — each trainer a GPU of its own
    (a Ray actor with num_gpus=1), engine i on GPU i mod the GPUs of its node, sharing them with
    the trainers (colocated). Weights still go to the engines over gloo, through CPU memory: NCCL
    takes one rank per GPU, and a colocated engine shares its trainer's. Not with batch_invariant
    (its invariance rules are this CPU build's). Written for GPUs, run on CPU only so far."""
    mode: str = "sync"
    """sync: colocated, generate -> reward -> train -> update weights, one after another (on-policy).
    async: disaggregated, the engines generate the next rollouts while the trainers train: rollout
    r starts once rollout r - max_staleness is trained, the weights go to the engines as each step
    ends (requests in flight are paused for the update and go on under the new weights: partial
    rollouts, each token's log-prob from the weights that sampled it), and every sample carries the
    version of the weights it was requested under. Off-policy samples are corrected by truncated
    importance sampling against the engines' log-probs (algorithm.tis_cap, required). The engines
    and the trainers compute at once: on the CPU the cores are shared out among all of them, with
    device cuda each engine gets a GPU of its own beside the trainers' (Ray's placement). Timing
    decides which weights sample what: not with deterministic."""
    max_staleness: int = 1
    """async: the most policy versions a trained sample may lag the weights it trains: rollout r is
    generated while rollouts up to r - 1 train, at most this many ahead of the trainer; a group
    requested under older weights (after a resume, say) is filtered as stale."""
    ray_address: str = ""
    """Ray cluster to join; empty starts a local instance."""
    weight_sync: str = "distributed"
    """distributed (torch.distributed broadcast to the engines) or disk (Hugging Face directory)."""
    eval_every: int = 10
    """Steps between held-out evaluations (also before the first and after the last step); 0: off."""
    eval_sources: list = field(default_factory=lambda: ["task:countdown:2", "task:countdown:3"])
    """Held-out prompt sets (task:... sets use held-out seeds)."""
    eval_n: int = 100
    """Prompts per evaluation set."""
    eval_samples: int = 0
    """Also evaluate by sampling: this many samples per held-out prompt at the rollout temperature
    (fixed seeds, the same at every evaluation); their mean accuracy (avg@k, the pass@1 of the
    policy as it is trained) is logged as eval_sampled/<set> and eval_sampled/accuracy. 0: greedy only."""
    checkpoint_every: int = 10
    """Steps between checkpoints (and at the end)."""
    debug: str = ""
    """'' (normal), rollout_only, or train_only (train from saved rollouts of debug_rollouts_from)."""
    debug_rollouts_from: str = ""
    """Run directory whose buffer holds the rollouts train_only replays."""
    save_rollouts: bool = False
    """Also write every rollout as JSONL under rollouts/."""
    wandb_project: str = ""
    """Log to Weights & Biases too under this project (pip install 'rlfoundry[wandb]'; `wandb login`, or
    WANDB_MODE=offline to write the run under the run directory for a later `wandb sync`)."""
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-5, final_lr=1e-5, warmup_steps=0, total_steps=1000, weight_decay=0.0, optimizer="adamw",
        mtp_schedule=[(0, 0.0)], balance_loss_weight=0.0, bias_update_rate=0.0))
    """Optimizer of the policy (RL defaults: constant lr, no MTP or balance loss, frozen balance bias)."""

    def validate(self) -> "RLConfig":
        def bad(name, why):
            raise ConfigError(f"field '{name}' {why}")

        if not (Path(self.model) / "config.json").exists():
            bad("model", f"must be a checkpoint directory with config.json, got {self.model!r}")
        for name in ("steps", "eval_n", "checkpoint_every", "num_trainers"):
            if getattr(self, name) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)!r}")
        if not self.max_minutes >= 0:
            bad("max_minutes", f"must be >= 0, got {self.max_minutes!r}")
        for name in ("skip_solved", "skip_unsolved"):
            if not 0.0 <= getattr(self.data, name) <= 1.0:
                bad(f"data.{name}", f"must be a probability in [0, 1], got {getattr(self.data, name)!r}")
        if not self.algorithm.oversample_margin >= 1.0:
            bad("algorithm.oversample_margin", f"must be >= 1, got {self.algorithm.oversample_margin!r}")
        if self.algorithm.refill_rounds < 0:
            bad("algorithm.refill_rounds", f"must be >= 0, got {self.algorithm.refill_rounds!r}")
        if self.eval_samples < 0:
            bad("eval_samples", f"must be >= 0, got {self.eval_samples!r}")
        if self.exact and self.train.bf16:
            bad("exact", "computes in fp64: it does not combine with train.bf16")
        if self.batch_invariant:
            for name, on in (("exact", self.exact), ("train.bf16", self.train.bf16),
                             ("train.compile", self.train.compile), ("rollout.compile_decode", self.rollout.compile_decode)):
                if on:
                    bad("batch_invariant", f"is fp32 and eager: it does not combine with {name}")
        if self.device not in ("cpu", "cuda"):
            bad("device", f"must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not self.ray_address:  # a cluster's GPUs are its nodes' to check
            from rlfoundry.rollout.launch import device_error

            why = device_error("cuda")
            if why:
                bad("device", why)
            import torch

            if self.num_trainers > torch.cuda.device_count():
                bad("num_trainers", f"needs a GPU each with device cuda: {self.num_trainers} trainers, "
                    f"{torch.cuda.device_count()} GPU(s) visible")
            engines_own = self.mode == "async" and not self.rollout.engine_urls
            if engines_own and self.num_trainers + self.rollout.num_engines > torch.cuda.device_count():
                bad("mode", f"async with device cuda gives every trainer and every engine a GPU of its own: "
                    f"{self.num_trainers} + {self.rollout.num_engines} needed, {torch.cuda.device_count()} visible")
        if self.device == "cuda" and self.batch_invariant:
            bad("batch_invariant", "is for the CPU (its invariance rules are this CPU build's): not with device cuda")
        if self.mode not in ("sync", "async"):
            bad("mode", f"must be sync or async, got {self.mode!r}")
        if self.mode == "async":
            if self.max_staleness < 1:
                bad("max_staleness", f"must be >= 1 with mode async, got {self.max_staleness!r}")
            if not self.algorithm.tis_cap > 0:
                bad("algorithm.tis_cap", "must be > 0 with mode async (truncated importance sampling corrects "
                    f"the off-policy samples), got {self.algorithm.tis_cap!r}")
            for name, on in (("deterministic", self.deterministic), ("debug", self.debug)):
                if on:
                    bad("mode", f"async generates while it trains: it does not combine with {name}={on!r}")
        if self.weight_sync not in ("distributed", "disk"):
            bad("weight_sync", f"must be distributed or disk, got {self.weight_sync!r}")
        if self.debug not in ("", "rollout_only", "train_only"):
            bad("debug", f"must be '', rollout_only or train_only, got {self.debug!r}")
        if self.debug == "train_only" and not (Path(self.debug_rollouts_from) / "buffer.sqlite").exists():
            bad("debug_rollouts_from", f"must be a run directory with buffer.sqlite for train_only, "
                f"got {self.debug_rollouts_from!r}")
        stages = []
        for i, st in enumerate(self.data.curriculum):
            stages.append(build_config(CurriculumStage, st, f"data.curriculum[{i}]."))
        if not stages:
            bad("data.curriculum", "needs at least one stage")
        self.data.curriculum = stages
        for i, st in enumerate(stages):
            if not st.source.startswith("task:") and not Path(st.source).exists():
                bad(f"data.curriculum[{i}].source", f"no such file or directory: {st.source!r}")
        r, a = self.rollout, self.algorithm
        for name in ("num_engines", "prompts_per_step", "n_samples_per_prompt", "max_new_tokens", "max_batch",
                     "concurrency"):
            if getattr(r, name) <= 0:
                bad(f"rollout.{name}", f"must be positive, got {getattr(r, name)!r}")
        from rlfoundry.rollout.launch import BACKENDS

        if r.backend not in BACKENDS:
            bad("rollout.backend", f"must be one of {sorted(BACKENDS)}, got {r.backend!r}")
        backend = BACKENDS[r.backend]()
        if self.weight_sync not in backend.weight_syncs:
            bad("weight_sync", f"the {r.backend} backend takes {' or '.join(backend.weight_syncs)}, "
                f"got {self.weight_sync!r}")
        for name, on in (("exact", self.exact), ("batch_invariant", self.batch_invariant),
                         ("rollout.routing_replay", r.routing_replay), ("rollout.compile_decode", r.compile_decode)):
            if on and name.removeprefix("rollout.") not in backend.modes:
                bad(name, f"is a mode of the rlfoundry engine, which the {r.backend} backend does not run")
        why = None if r.engine_urls else backend.missing()
        if why:
            bad("rollout.backend", f"{r.backend}: {why}")
        for i, url in enumerate(r.engine_urls):
            parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                bad(f"rollout.engine_urls[{i}]", f"must be http://host:port, got {url!r}")
        if r.engine_urls and r.num_engines not in (1, len(r.engine_urls)):
            bad("rollout.num_engines", f"is the number of rollout.engine_urls ({len(r.engine_urls)}) when they "
                f"are given, got {r.num_engines}")
        if r.engine_urls and r.engine_args:
            bad("rollout.engine_args", "are for the engines the loop starts, not those at rollout.engine_urls")
        if not all(isinstance(a, str) for a in r.engine_args):
            bad("rollout.engine_args", f"must be a list of strings, got {r.engine_args!r}")
        if r.engine_threads < 0:
            bad("rollout.engine_threads", f"must be 0 (the cores shared out among the engines) or positive, "
                f"got {r.engine_threads!r}")
        if r.max_len < 0 or 0 < r.max_len <= r.max_new_tokens:
            bad("rollout.max_len", f"must be 0 (the model's context) or more than rollout.max_new_tokens "
                f"({r.max_new_tokens}), got {r.max_len!r}")
        try:
            context = ModelConfig.from_json_file(Path(self.model) / "config.json").max_position_embeddings
        except ValueError as e:  # the model's own ConfigError, naming the file
            bad("model", f"has no usable config.json: {e}")
        if r.max_len > context:
            bad("rollout.max_len", f"must be at most the model's max_position_embeddings ({context}), "
                f"got {r.max_len!r}")
        if r.temperature <= 0:
            bad("rollout.temperature", f"must be > 0 for RL sampling, got {r.temperature}")
        if a.advantage not in ADVANTAGES:
            bad("algorithm.advantage", f"must be one of {ADVANTAGES}, got {a.advantage!r}")
        if a.advantage in ("grpo", "dr_grpo", "rloo", "reinforce++_baseline") and r.n_samples_per_prompt < 2:
            bad("rollout.n_samples_per_prompt", f"must be >= 2 for {a.advantage} (group baselines)")
        if a.positive_weight <= 0:
            bad("algorithm.positive_weight", f"must be > 0, got {a.positive_weight}")
        if a.policy_loss not in ("ppo", "gspo"):
            bad("algorithm.policy_loss", f"must be ppo or gspo, got {a.policy_loss!r}")
        if a.aggregation not in AGGREGATIONS:
            bad("algorithm.aggregation", f"must be one of {AGGREGATIONS}, got {a.aggregation!r}")
        if a.kl_kind not in KL_KINDS:
            bad("algorithm.kl_kind", f"must be one of {KL_KINDS}, got {a.kl_kind!r}")
        if a.dual_clip and a.dual_clip <= 1:
            bad("algorithm.dual_clip", f"must be > 1 (or 0: off), got {a.dual_clip}")
        if a.dual_clip and a.policy_loss == "gspo":
            bad("algorithm.dual_clip", "applies to policy_loss ppo only")
        if a.updates_per_rollout <= 0 or a.micro_batch_size <= 0:
            bad("algorithm.updates_per_rollout", "and micro_batch_size must be positive")
        if a.hindsight < 0:
            bad("algorithm.hindsight", f"must be >= 0 (0: off), got {a.hindsight}")
        if a.hindsight_per_group < 1:
            bad("algorithm.hindsight_per_group", f"must be >= 1, got {a.hindsight_per_group}")
        if a.hindsight and r.routing_replay:
            bad("algorithm.hindsight", "cannot be used with rollout.routing_replay: relabelled prompts have no "
                "routes to replay")
        if self.reward.overlong_cache < 0 or self.reward.overlong_cache >= r.max_new_tokens:
            bad("reward.overlong_cache", f"must be in [0, rollout.max_new_tokens), got {self.reward.overlong_cache}")
        if self.reward.fn == "remote" and not self.reward.remote_url:
            bad("reward.remote_url", "is required with reward.fn: remote")
        from rlfoundry.rewards import load_function, load_reward

        if r.generate_fn:
            import asyncio

            try:
                fn = load_function(r.generate_fn, "generate_fn")
            except ValueError as e:
                bad("rollout.generate_fn", f"is not usable: {e}")
            if not asyncio.iscoroutinefunction(fn):
                bad("rollout.generate_fn", "must be an async function (async def generate(ctx, sample, sampling))")

        if a.hindsight_fn:
            try:
                load_function(a.hindsight_fn, "hindsight_fn")
            except ValueError as e:
                bad("algorithm.hindsight_fn", f"is not usable: {e}")
        try:
            load_reward(self.reward.fn)
        except ValueError as e:
            bad("reward.fn", f"is not usable: {e}")
        return self


def load_rl_config(path: str | None, overrides: list[str]) -> RLConfig:
    values = read_config_values(path, overrides)
    if "train" in values and "mtp_schedule" in values["train"]:
        values["train"]["mtp_schedule"] = [tuple(x) for x in values["train"]["mtp_schedule"]]
    if "train" in values:  # RL's defaults, with the file's changes on top
        import dataclasses

        base = dataclasses.asdict(RLConfig().train)
        values["train"] = base | values["train"]
    return build_config(RLConfig, values).validate()
