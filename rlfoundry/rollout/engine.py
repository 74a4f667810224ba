"""The inference engine: token ids in; token ids, log-probs (and routed experts) out.

It knows nothing of text. Requests join and leave between decode steps (continuous batching) on a
slot KV cache of bounded size (`max_batch` sequences x `max_len` positions); requests beyond it
wait in a queue. The running sequences always occupy slots 0..n-1 (a finished sequence's slot is
refilled by moving the last one into it), so every decode step reads the cache as a view.

Each generated token comes with its log-probability in fp32 under the distribution it was sampled
from after temperature — top-p / top-k / min-p truncation not applied; for greedy, the raw softmax —
which is the quantity the trainer computes for the same tokens.

Threading: `add_request`, `abort`, `pause`, `resume` and `update_weights` may be called from any
thread; the model runs only in the thread that drives the loop (`run`, or the background thread of
`start()`; without either, the caller of `generate`), which also carries out aborts, pauses and
weight updates between two steps.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from rlfoundry.model import Glm4MoeForCausalLM, KVCache, kernels
from rlfoundry.model.glm4_moe import DECODE_ATTENTION_MAX_T, CacheStep, at_least_fp32
from rlfoundry.model.hf_io import read_tensors, update_from_tensors
from rlfoundry.rollout.aot import AOTPrefill, AOTStep


class RequestError(ValueError):
    """A request is invalid; the message names the field and the value."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    """Most tokens to generate (the context length may stop it earlier)."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability mass (1 keeps all)."""
    top_k: int = -1
    """Keep the k most likely tokens (-1 or 0 keeps all)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the sequence (included in the output), besides EOS."""
    ignore_eos: bool = False
    """Do not stop at the model's EOS token(s)."""
    seed: int | None = None
    """Same seed, same prompt, same weights -> same output. None draws one from the engine."""
    n: int = 1
    """Samples of this prompt; they share one prefill."""
    return_routed_experts: bool = False
    """Return the expert ids chosen for every input position (for routing replay in training)."""

    def validate(self) -> "SamplingParams":
        def fail(name: str, why: str) -> None:
            raise RequestError(f"sampling_params.{name} {why}, got {getattr(self, name)!r}")

        for name, kind in (("max_new_tokens", int), ("top_k", int), ("n", int)):
            if not isinstance(getattr(self, name), kind) or isinstance(getattr(self, name), bool):
                fail(name, "must be an integer")
        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                fail(name, "must be a number")
        if self.max_new_tokens < 0:
            fail("max_new_tokens", "must be >= 0")
        if self.temperature < 0:
            fail("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if self.n < 1:
            fail("n", "must be >= 1")
        if not isinstance(self.stop_token_ids, list) or not all(isinstance(t, int) for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of integers")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            fail("seed", "must be an integer or null")
        return self


@dataclass
class Output:
    """One finished sample."""
    request_id: str
    index: int                        # which of the request's n samples
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]             # one per output token, fp32 values
    finish_reason: str                # "stop" | "length" | "abort"
    matched_stop: int | None          # the stop token that ended it
    weight_version: str               # the weights that produced the last token
    routed_experts: Tensor | None = None  # [prompt + output - 1, L_moe, K] when asked


class _Request:
    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                 on_done: Callable[["_Request"], None] | None):
        self.id, self.prompt_ids, self.params, self.on_done = rid, prompt_ids, params, on_done
        self.outputs: list[Output | None] = [None] * params.n
        self.seqs: list[_Seq] = []
        self.done = threading.Event()
        self.arrival = time.perf_counter()
        self.on_progress: Callable[["_Request"], None] | None = None  # called after each step with new tokens

    def finish_one(self, out: Output) -> None:
        self.outputs[out.index] = out
        if all(o is not None for o in self.outputs):
            self.done.set()
            if self.on_done is not None:
                self.on_done(self)


class RandomStream:
    """A sequence's own uniform draws in [0, 1), from a generator seeded for it alone, so that its
    samples do not depend on what else is in the batch. Drawn 64 at a time: one generator call
    instead of one per token (one call per row took the sampler of a batch-256 step from 0.6 to
    1.15 ms). fp32 values, exact in fp32 and fp64 arithmetic alike: an fp64 draw rounded to fp32
    could become 1.0 and pick a token of probability 0."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self._ahead: list[float] = []

    def next(self) -> float:
        if not self._ahead:
            self._ahead = torch.rand(64, generator=self.generator, dtype=torch.float32).tolist()[::-1]
        return self._ahead.pop()


class _Seq:
    def __init__(self, req: _Request, index: int, rng: RandomStream):
        self.req, self.index, self.rng = req, index, rng
        self.slot = -1
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.routed: list[Tensor] = []
        # speculative decoding: (hidden state, next token) pairs not yet in the MTP cache
        self.mtp_h: Tensor | None = None
        self.mtp_ids: list[int] = []
        # compiled greedy speculative decoding: the next cycle's drafts, when the last cycle's
        # `greedy_cycle` drafted them from those pairs (already in the MTP cache)
        self.drafts: list[int] | None = None


def _filter_probs(probs_BV: Tensor, top_k_B: Tensor, top_p_B: Tensor, min_p_B: Tensor) -> Tensor:
    """Zero the tokens that top-k, top-p (nucleus) and min-p drop; the most likely token always stays."""
    sorted_p, order = probs_BV.sort(dim=-1, descending=True)
    rank = torch.arange(probs_BV.shape[-1], device=probs_BV.device)[None]
    keep = (top_k_B[:, None] <= 0) | (rank < top_k_B[:, None])
    keep &= (sorted_p.cumsum(-1) - sorted_p) < top_p_B[:, None]
    keep &= sorted_p >= min_p_B[:, None] * sorted_p[:, :1]
    return torch.zeros_like(probs_BV).scatter_(1, order, sorted_p * keep)


def _filters(params: list[SamplingParams], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """top_k, top_p and min_p of each row, as `_filter_probs` takes them, on `device`."""
    return (torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device))


def sample(logits_BV: Tensor, params: list[SamplingParams], streams: list[RandomStream]) -> tuple[Tensor, Tensor]:
    """Next token ids [B] and their fp32 log-probs [B] under softmax(logits / temperature)
    (raw softmax for greedy rows), computed in fp32 (fp64 for an fp64 model, then rounded). Each
    sampled row draws from its own stream, so a sequence's samples do not depend on what else is
    in the batch."""
    logits = logits_BV.to(at_least_fp32(logits_BV.dtype))
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)  # as the trainer divides
    greedy = temps == 0
    logprobs_BV = (logits / torch.where(greedy, 1.0, temps)[:, None]).log_softmax(-1)
    ids = logits.argmax(-1)
    rows = (~greedy).nonzero().flatten().tolist()
    if rows:
        probs = logprobs_BV[rows].exp()
        sub = [params[r] for r in rows]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in sub):
            probs = _filter_probs(probs, *_filters(sub, probs.device))
        ids[rows] = draw(probs, [streams[r] for r in rows])
    return ids, logprobs_BV.gather(1, ids[:, None]).flatten().float()


def draw(probs_BV: Tensor, streams: list[RandomStream]) -> Tensor:
    """Token ids [B], one per row of (not necessarily normalised) probabilities, by inverting the
    row's cumulative distribution at the next uniform of its stream."""
    u_B = torch.tensor([s.next() for s in streams], dtype=probs_BV.dtype, device=probs_BV.device)
    cdf = probs_BV.cumsum(-1)
    picked = torch.searchsorted(cdf, (u_B * cdf[:, -1])[:, None], right=True)
    return picked.clamp(max=probs_BV.shape[-1] - 1).flatten()


def _draw_one(probs_V: Tensor, rng: RandomStream) -> int:
    """`draw` for one distribution [V] (speculative decoding's drafts and corrections)."""
    return int(draw(probs_V[None], [rng])[0])


def greedy_drafts(model: Glm4MoeForCausalLM, hidden_BTD: Tensor, next_ids_BT: Tensor, step: CacheStep,
                  k: int, last_B: Tensor) -> Tensor:
    """k greedy draft tokens [B, k] from the MTP layer: one forward over the T pairs (hidden state,
    next token) that catch its cache up in `step`, whose last real position drafts the first
    token, then k - 1 one-token steps, each fed the layer's own output hidden state and its draft
    (as `Engine._decode_speculative` drafts). One function, so that torch.compile makes one graph
    of the chain: a compiled call's fixed cost (dynamo's guards, the wrapper) is paid once per
    cycle instead of k times. The cache's lengths are not advanced (the engine sets them after
    verification).

    `last_B`: the index of each row's last real pair; the rest of the row is padding (after
    verification accepted different numbers of drafts, the usual case beyond batch 1). The
    padding is written to the cache too — past the row's real positions, where no real query sees
    it (keys are visible only up to a query's own position) and where the row's next draft step
    writes over it — so that every row has the same shape and the chain stays one graph."""
    # (the block's MLP and the output head over the last real pair only: `keep_B`)
    logits, h_B1D, _, _ = model.mtp_forward_layers(hidden_BTD, next_ids_BT, step.position_ids_BT, step.mask(), step,
                                                   keep_B=last_B)
    pos_B1 = step.position_ids_BT.gather(1, last_B[:, None])
    draft_B = logits[:, 0].argmax(-1)
    drafts = [draft_B]
    for i in range(1, k):
        pos_B1 = pos_B1 + 1
        s = CacheStep(step.cache, step.slots_B, pos_B1, None, step.num_keys + i, step.slot_range)
        logits, h_B1D, _, _ = model.mtp_forward_layers(h_B1D, draft_B[:, None], pos_B1, s.mask(), s)
        draft_B = logits[:, -1].argmax(-1)
        drafts.append(draft_B)
    return torch.stack(drafts, 1)


def greedy_cycle(model: Glm4MoeForCausalLM, ids_BT: Tensor, step: CacheStep, mtp_step: CacheStep, k: int,
                 last_B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Greedy speculative decoding's verification and the next cycle's drafting as one function,
    so that torch.compile makes one graph of a cycle and a cycle pays one compiled call's fixed
    cost (at batch 1 here, two graphs called in turn took 0.3 - 0.5 ms more than the two called
    alone, against ~0.6 ms for a whole decode step). `decode_forward` over `ids_BT` (positions in
    `step`), the main model's choice at each position, then the MTP layer caught up with the
    pairs (hidden state at t, token t + 1) of positions 0..a of each row in `mtp_step` (the same
    positions, in the MTP cache; the pairs past a row's a are padding, see `greedy_drafts`) and k
    drafts for the next cycle. Two uses, one graph per shape regime for both:
    - verification: `ids_BT` the pending token and k drafts (T = k + 1), `last_B` -1: each row keeps
      the drafts up to its first that differs from the main model's choice (a drafts kept; the
      choice after them is the next token), and its pairs' next tokens are those choices;
    - a greedy prefill: `ids_BT` the prompts (rows padded to the longest), `last_B` each prompt's
      length - 1 (a): the pairs' next tokens are the prompt's own, and at a the model's first
      choice — the MTP layer's prefill and the first cycle's drafts in the prefill's call.
    Returns the main model's choices [B, T] with their log-probs, the next drafts [B, k], the
    hidden states and the routed expert ids."""
    _, target_BT, lp_BT, h_BTD, routed = decode_forward(model, ids_BT, step)
    T = ids_BT.shape[1]
    t_T = torch.arange(T, device=ids_BT.device)
    # token t + 1 at t (the last column wraps around: never kept); no [B, T - 1] slices, whose size
    # dynamo would specialise where T = 2 (a prefill of 2 tokens would be a graph of its own)
    next_BT = ids_BT.roll(-1, 1)
    kept_B = ((next_BT == target_BT) & (t_T < T - 1)).long().cumprod(1).sum(1)
    last_B = torch.where(last_B < 0, kept_B, last_B)
    # pairs up to a row's last: the given next tokens (for kept drafts, the model's choices too)
    next_BT = torch.where(t_T < last_B[:, None], next_BT, target_BT)
    drafts_Bk = greedy_drafts(model, h_BTD, next_BT, mtp_step, k, last_B)
    return target_BT, lp_BT, drafts_Bk, h_BTD, routed


def decode_forward(model: Glm4MoeForCausalLM, ids_BT: Tensor, step: CacheStep
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """A cached forward of the main model over a decode step's token (T = 1) or speculative
    verification's k + 1 (`step` places them in its cache, whose lengths are not advanced): the
    logits [B, T, V], the greedy choice at each position [B, T] with its log-prob (the raw
    log-softmax in fp32, or fp64 for an fp64 model, returned in fp32, as `sample` gives them),
    the normed hidden states (the MTP layer's inputs) and the routed expert ids. The engine
    compiles it as one graph with the reductions, so that an all-greedy step reads two small
    tensors and never touches the logits; a step with sampled rows samples from the logits."""
    logits, h, routed, _ = model.forward_layers(ids_BT, step.position_ids_BT, step.mask(), step)
    logprobs = logits.to(at_least_fp32(logits.dtype)).log_softmax(-1)  # as `sample` computes them
    choice = logits.argmax(-1)
    return logits, choice, logprobs.gather(-1, choice[..., None])[..., 0].float(), h, routed


def _compile(fn: Callable) -> Callable:
    """`fn` as the engine compiles it: one graph for a range of batch sizes (dynamic=True), no
    graph breaks, inductor's C++ wrapper; and Python floats specialised while dynamo traces
    (the model's RMSNorm eps and config factors, the embedding's norm type: 24 values, constants
    in the graph rather than inputs converted to tensors at every call, ~0.2 ms a call here). Only
    around these calls: a process-wide setting would recompile other compiled code (a trainer's)
    at every new value of a float it takes."""
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
    return torch._dynamo.config.patch(specialize_float=True)(compiled)


class Engine:
    ADMIT_MAX_WAIT_S = 0.05
    """The longest an idle loop waits for a burst of requests to end (see `admit_quiet_s`)."""

    def __init__(self, model: Glm4MoeForCausalLM, max_batch: int = 64, max_len: int | None = None,
                 eos_token_ids: Iterable[int] | None = None, seed: int = 0,
                 max_prefill_tokens: int = 8192, weight_version: str = "0", speculative_steps: int = 0,
                 compile_decode: bool = False, admit_quiet_s: float = 0.0, batch_invariant: bool = False):
        """`batch_invariant`: the model computes every sequence as if alone (see
        `Glm4MoeForCausalLM.set_batch_invariant`), so that a trainer doing the same gets the engine's
        log-probs bit for bit in fp32 (RL's `batch_invariant`); eager decoding only.
        `admit_quiet_s` > 0: when the loop (`run`) is idle and requests arrive, it starts them
        once none has arrived for that long (at most ADMIT_MAX_WAIT_S after the first), so that a
        burst sent at once — an RL step's groups, each its own HTTP request — is prefilled and
        decoded together rather than in waves. The engine server sets it (`--admit-quiet-ms`)."""
        if admit_quiet_s < 0:
            raise ValueError(f"admit_quiet_s must be >= 0, got {admit_quiet_s}")
        self.admit_quiet_s = admit_quiet_s
        if batch_invariant and compile_decode:
            raise ValueError("batch_invariant needs eager decoding: compiled kernels sum in their own orders")
        self.model = model.eval()
        if batch_invariant:
            model.set_batch_invariant()
        cfg = model.config
        # Decode steps through a torch.compile'd `decode_forward` (inductor: fused element-wise
        # kernels, far fewer dispatches; the greedy choice and its log-prob reduced inside the
        # graph). It compiles once per batch-size regime (`warmup` does all of them up front, else
        # the first steps of each); logits differ from eager by float rounding only (see the README
        # and benchmarks/bench_mismatch.py). With speculative decoding, verification (k+1 tokens a
        # row) goes through the same compiled function, and the MTP layer's drafts through a
        # compiled `mtp_forward_layers` — or, greedy, the whole draft chain through one compiled
        # `greedy_drafts`, and once every row has its drafts from the cycle before, verification
        # and the next drafts through one compiled `greedy_cycle`. A prefill of prompts of at most
        # DECODE_ATTENTION_MAX_T tokens runs through the same compiled `decode_forward` (the MTP
        # layer's through the compiled `mtp_forward_layers`; a greedy speculative prefill, with the
        # MTP layer's and the first drafts, through `greedy_cycle`), longer ones eager
        # (`_compiled_prefill`).
        self._forward = self._mtp_layers = self._greedy_drafts = self._greedy_cycle = None
        if speculative_steps and not cfg.num_nextn_predict_layers:
            raise ValueError("speculative_steps needs a model with an MTP layer (num_nextn_predict_layers >= 1)")
        self.spec_steps = speculative_steps
        if compile_decode:
            # Every compiled function keeps a graph per batch-size regime, token-count regime and
            # model shape (for all the engines of the process); under fullgraph=True, dynamo's
            # default limit of 8 graphs a function is a hard failure, not a fallback.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            self._forward = _compile(decode_forward)
            if speculative_steps:
                self._mtp_layers = _compile(model.mtp_forward_layers)
                self._greedy_drafts = _compile(greedy_drafts)
                self._greedy_cycle = _compile(greedy_cycle)
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        # the most tokens a row of a compiled prefill (`_compiled_prefill`, `_prefill_shapes`)
        self._prefill_max_t = min(DECODE_ATTENTION_MAX_T, self.max_len - 1) if compile_decode else 0
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        dtype = self.dtype
        # compiled on CPU in fp32: attention through our native kernel (built on first use, see
        # `rlfoundry.model.kernels`), which reads keys stored position-contiguous
        keys_by_dim = compile_decode and kernels.applies(self.device, dtype, load_now=True)
        self.cache = KVCache.for_model(cfg, max_batch, self.max_len, dtype=dtype, device=self.device,
                                       value_ones=batch_invariant, keys_by_dim=keys_by_dim)
        # the MTP layer's own cache: position t holds the pair (h_t, token t+1)
        self.mtp_cache = KVCache.for_model(cfg, max_batch, self.max_len, num_layers=1, dtype=dtype,
                                           device=self.device, value_ones=batch_invariant,
                                           keys_by_dim=keys_by_dim) if speculative_steps else None
        # Such an engine (compiled, CPU, fp32) runs the same functions compiled ahead of time
        # (`aot.AOTStep`: no dynamo guards or Python layers around the graph), built by `warmup`
        # or at first use: plain decode steps (`decode_forward`) or, speculative, the greedy cycle
        # of k drafts (`greedy_cycle`); the torch.compile'd functions take the rest
        self._aot: AOTStep | None = None
        self._aot_cycle: AOTStep | None = None
        self._aot_wanted = keys_by_dim and not speculative_steps
        self._aot_cycle_wanted = keys_by_dim and bool(speculative_steps)
        # and a prefill of one prompt (batch 1, the first row): `decode_forward`, or a greedy
        # speculative prefill's `greedy_cycle` (`_aot_prefill_step`)
        self._aot_prefill: AOTPrefill | None = None
        self._aot_prefill_wanted = keys_by_dim
        if compile_decode:  # the batch size varies, the cache's shape never does
            for c in (self.cache, self.mtp_cache):
                for t in (c.k + c.v if c is not None else []):
                    torch._dynamo.mark_static(t)
        eos = cfg.eos_token_id if eos_token_ids is None else list(eos_token_ids)
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.weight_version = weight_version
        self._rng = random.Random(seed)
        # Two locks: `_lock` is held for a whole step (model, cache, running sequences); `_submit`
        # only for a moment, around the queue of waiting requests, the request table and the queue
        # of control calls. Requests are queued under `_submit` alone, so a server thread never
        # waits for a step to end: all requests that arrive during a step join at the next one.
        # Order when both are held: `_lock`, then `_submit`. Control calls (abort, pause, weight
        # updates) run between two steps on the thread that drives the loop (`_control`): torch
        # ops from another thread would start a second OpenMP thread team, and with more threads
        # than cores libgomp throttles the spin-waiting of every team — decode steps then ran
        # ~1.8x slower here, for as long as the other thread lived.
        self._lock = threading.RLock()
        self._submit = threading.Lock()
        self._wake = threading.Condition(self._submit)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Seq] = []          # running[i].slot == i
        self._requests: dict[str, _Request] = {}
        self._paused = False
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None  # ident of the thread in `run`, if any
        self._stop = False
        self._last_arrival = 0.0  # time.monotonic() of the last request queued
        self.stats = {"generated_tokens": 0, "prompt_tokens": 0, "steps": 0, "prefills": 0, "finished": 0,
                      "spec_verify_steps": 0, "spec_emitted_tokens": 0, "spec_accept_length": 0.0}

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, on_done: Callable[[_Request], None] | None = None) -> _Request:
        params = (params or SamplingParams()).validate()
        if not prompt_ids or not all(isinstance(t, int) and 0 <= t < self.model.config.vocab_size for t in prompt_ids):
            raise RequestError(f"input_ids must be a non-empty list of token ids in [0, {self.model.config.vocab_size})")
        if len(prompt_ids) >= self.max_len:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.max_len} tokens")
        if params.n > self.max_batch:
            raise RequestError(f"sampling_params.n must be <= max_batch={self.max_batch}, got {params.n}")
        rid = request_id or uuid.uuid4().hex
        with self._submit:
            if rid in self._requests:
                raise RequestError(f"request id {rid!r} is already running")
            req = _Request(rid, list(prompt_ids), params, on_done)
            for i in range(params.n):
                seed = self._rng.randrange(1 << 62) if params.seed is None else params.seed * 1_000_003 + i
                req.seqs.append(_Seq(req, i, RandomStream(seed)))
            self._requests[rid] = req
            self._waiting.append(req)
            self._last_arrival = time.monotonic()
            self._wake.notify_all()
        return req

    def warmup(self) -> None:
        """With compile_decode: compile now every graph that decoding can need, so that no request
        waits for one (the server calls this before reporting healthy). A compiled function keeps a
        graph per regime of its input shapes: batch 1 or more, one token a row or more (dynamo
        specialises sizes of 1), and each side of every token count where the model's inference
        forward changes path (`Glm4MoeForCausalLM.token_switches`: the MoE blocks' dense decode
        path ends; B x T tokens) or its attention does (T: `DECODE_ATTENTION_MAX_T`). Each compiled
        function is called here once for each shape that can start a regime: every token count T a
        row that the engine gives it, and for each T batch 1, batch 2 and the first batch size past
        each switch (of B x T, and of B alone for the draft chain's one-token steps), up to
        max_batch. Plain decoding: `decode_forward` on 1 token a row; speculative decoding also
        verification (k' + 1 tokens, k' <= k as the end of a response nears), the greedy draft
        chain (`greedy_drafts`, catch-ups of 2 to k + 1 pairs), the greedy cycle (`greedy_cycle`:
        k + 1 tokens) and the sampled drafts' MTP layer (catch-ups of 1 to k + 1 pairs, then
        one-token steps). Then the prefill's regimes (`_prefill_shapes`), of `decode_forward` and,
        speculative, of the MTP layer and of `greedy_cycle` (greedy prefills). Needs an idle engine
        (it writes the caches' first slots)."""
        if self._forward is None:
            return
        with self._lock:
            if self._running or self._waiting:
                raise RuntimeError("warmup needs an idle engine: it writes the KV caches")
            self._aot_step()
            self._aot_cycle_step()
            self._aot_prefill_step()
            k, switches, device = self.spec_steps, self.model.token_switches(), self.device
            D, dtype = self.model.config.hidden_size, self.dtype

            def batches(T: int) -> list[int]:  # (none where the context cannot hold 1 + T tokens)
                firsts = {1, 2} | {-(-n // t) for n in switches for t in (T, 1)}
                return sorted(B for B in firsts if B <= self.max_batch and 1 + T <= self.max_len)

            def step(cache: KVCache, B: int, T: int) -> CacheStep:  # 1 token already cached: no size-1 key count
                return CacheStep.rows(cache, [1] * B, T, device)

            with torch.no_grad():
                for T in range(1, k + 2):  # decode steps; verification of k' + 1 tokens
                    for B in batches(T):
                        self._forward(self.model, torch.zeros(B, T, dtype=torch.long, device=device),
                                      step(self.cache, B, T))
                for T in range(1, k + 2) if k else []:  # drafting, after a catch-up of T pairs a row
                    for B in batches(T):
                        h = torch.zeros(B, T, D, dtype=dtype, device=device)
                        ids = torch.zeros(B, T, dtype=torch.long, device=device)
                        if T >= 2:  # the compiled greedy chain pads catch-ups to 2 pairs at least
                            self._greedy_drafts(self.model, h, ids, step(self.mtp_cache, B, T), k,
                                                torch.full((B,), T - 1, device=device))
                        if T == k + 1:  # verification and the next drafts, in one graph
                            self._greedy_cycle(self.model, ids, step(self.cache, B, T), step(self.mtp_cache, B, T), k,
                                               torch.full((B,), -1, device=device))
                        self.mtp_cache.lens[:B] = 1  # (T = 1: also a sampled draft step)
                        self.model.mtp_forward(h, ids, cache=self.mtp_cache, slots=torch.arange(B, device=device),
                                               layers_fn=self._mtp_layers,
                                               keep_B=torch.full((B,), T - 1, device=device) if T > 1 else None)
                # prefills (a speculative engine's share the graphs above; a greedy one's run
                # through `greedy_cycle`)
                for B, T in self._prefill_shapes():
                    ids = torch.zeros(B, T, dtype=torch.long, device=device)
                    self._forward(self.model, ids, step(self.cache, B, T))
                    if k:
                        self._greedy_cycle(self.model, ids, step(self.cache, B, T), step(self.mtp_cache, B, T), k,
                                           torch.full((B,), T - 1, device=device))
                        self.mtp_cache.lens[:B] = 1
                        self.model.mtp_forward(torch.zeros(B, T, D, dtype=dtype, device=device), ids,
                                               cache=self.mtp_cache, slots=torch.arange(B, device=device),
                                               layers_fn=self._mtp_layers,
                                               keep_B=torch.zeros(B, dtype=torch.long, device=device))
            self.cache.lens.zero_()
            if self.mtp_cache is not None:
                self.mtp_cache.lens.zero_()

    def _control(self, fn: Callable[[], Any]) -> Any:
        """fn() between two steps, on the thread that runs the model: the loop's when one runs
        (`start`/`run`; the caller waits for it), else this one."""
        with self._submit:
            queued = self._loop_thread is not None and self._loop_thread != threading.get_ident()
            if queued:
                fut: concurrent.futures.Future = concurrent.futures.Future()
                self._calls.append((fn, fut))
                self._wake.notify_all()
        if queued:
            return fut.result()
        with self._lock:
            return fn()

    def abort(self, request_id: str) -> bool:
        """Finish a request now with finish_reason "abort" (its tokens so far are kept)."""
        def abort() -> bool:
            found = self._abort(request_id)
            self._compact()
            return found
        return self._control(abort)

    def abort_all(self) -> None:
        def abort_all() -> None:
            with self._submit:
                rids = list(self._requests)
            for rid in rids:
                self._abort(rid)
            self._compact()  # once for all of them
        self._control(abort_all)

    def _abort(self, request_id: str) -> bool:
        with self._submit:
            req = self._requests.get(request_id)
            if req is None:
                return False
            if req in self._waiting:
                self._waiting.remove(req)
        for seq in req.seqs:
            if seq.slot >= 0 or req.outputs[seq.index] is None:
                self._finish(seq, "abort", None)
        return True

    def pause(self) -> None:
        """Stop generating; running sequences keep their KV cache and continue on `resume`."""
        def pause() -> None:
            self._paused = True
        self._control(pause)

    def resume(self) -> None:
        with self._submit:
            self._paused = False
            self._wake.notify_all()

    @property
    def device(self) -> torch.device:
        """Where the model, its caches and every tensor the engine makes for it are."""
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """What the model's weights, its caches and its arithmetic are in."""
        return self.model.model.embed_tokens.weight.dtype

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def looping(self) -> bool:
        """Whether a loop drives the engine (`start`, or `run` in some thread)."""
        return self._loop_thread is not None

    def update_weights(self, source: dict[str, Tensor] | Iterable[tuple[str, Tensor]] | str | Path,
                       version: str | None = None) -> int:
        """Replace weights in place between two steps: a full state dict, any subset of tensors
        (checkpoint or our names), or a checkpoint directory. Returns the number of tensors copied."""
        tensors = read_tensors(Path(source)) if isinstance(source, (str, Path)) else source
        def update() -> int:
            n = update_from_tensors(self.model, tensors)
            for aot in (self._aot, self._aot_cycle, self._aot_prefill):  # (copied in place, so already seen; a replaced tensor would not be)
                if aot is not None:
                    aot.bind_weights()
            self.weight_version = str(version) if version is not None else str(int(self.weight_version) + 1
                                                                                  if self.weight_version.isdigit() else 1)
            return n
        return self._control(update)

    def flush_cache(self) -> bool:
        """Drop cached prefixes. The slot cache keeps none beyond running sequences: a no-op that
        reports whether the engine is idle (SGLang refuses to flush while requests run)."""
        return self._control(lambda: not self._running and not self._waiting)

    def load(self) -> dict:
        """A snapshot for metrics, read without waiting for the running step (may be one step old)."""
        running = len(self._running)
        return {"running": running, "waiting": len(self._waiting),
                "kv_used_tokens": int(self.cache.lens[:running].sum()) if running else 0,
                "kv_capacity_tokens": self.max_batch * self.max_len}

    # ------------------------------------------------------------------ the loop
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: admit and prefill waiting requests, then one decode step for all."""
        with self._lock:
            if self._paused:
                return
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
                self._compact()
            if self._running:
                self._decode()
                self._compact()
            self.stats["steps"] += 1

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 timeout: float | None = None) -> list[list[Output]]:
        """Blocking: all samples of all prompts, in order. Drives the loop itself unless a loop runs
        (`start` or `run` in another thread)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while not all(r.done.is_set() for r in reqs) and not self.looping:  # a loop may start meanwhile
            if self._paused:
                raise RuntimeError("the engine is paused; nothing would finish")
            self.step()
        for r in reqs:
            if not r.done.wait(timeout):
                raise TimeoutError("generation did not finish in time")
        return [list(r.outputs) for r in reqs]

    def start(self) -> "Engine":
        """Run the loop (`run`) in a background thread until `shutdown`."""
        if self._thread is None and self._loop_thread is None:
            self._thread = threading.Thread(target=self.run, name="rlfoundry-engine", daemon=True)
            with self._submit:
                self._stop = False
                self._loop_thread = -1  # control calls queue from now on; `run` takes them
            self._thread.start()
        return self

    def run(self) -> None:
        """Drive the loop in the calling thread until `shutdown` (or an exception, e.g. Ctrl-C):
        the engine server runs it on its main thread, the one that loaded the model (see
        `_control` for why the thread matters)."""
        with self._submit:
            started_for_me = self._loop_thread == -1 and self._thread is threading.current_thread()  # by start()
            if self._loop_thread is not None and not started_for_me:
                raise RuntimeError("the engine's loop is already running (start() or run() in another thread)")
            self._loop_thread = threading.get_ident()
        try:
            while True:
                with self._submit:
                    while not self._stop and not self._calls and (self._paused or not self.has_work()):
                        self._wake.wait()
                    if self._stop:
                        return
                    if not self._running and self._waiting and not self._calls and self.admit_quiet_s > 0:
                        self._await_quiet()
                    calls = list(self._calls)
                    self._calls.clear()
                self._carry_out(calls)
                if not self._paused and self.has_work():
                    self.step()
        finally:
            with self._submit:
                self._loop_thread = None
                self._stop = False
                calls = list(self._calls)
                self._calls.clear()
            self._carry_out(calls)  # came in as the loop stopped: run them here

    def _await_quiet(self) -> None:
        """(`_submit` held.) The engine is idle and requests have come: wait while more keep
        arriving, until none has for `admit_quiet_s` (at most ADMIT_MAX_WAIT_S in all)."""
        deadline = time.monotonic() + self.ADMIT_MAX_WAIT_S
        while not self._stop and not self._calls:
            until = min(self._last_arrival + self.admit_quiet_s, deadline)
            left = until - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)

    def _carry_out(self, calls: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
        """Run queued control calls, handing each caller its result or exception."""
        for fn, fut in calls:
            try:
                with self._lock:
                    fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def shutdown(self) -> None:
        """Stop the loop (`start`'s thread or `run`) after its current step."""
        with self._submit:
            self._stop = self._loop_thread is not None
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ internals (lock held)
    def _admit(self) -> list[_Request]:
        admitted, tokens = [], 0
        with self._submit:
            while self._waiting:
                req = self._waiting[0]
                free = self.max_batch - len(self._running) - sum(r.params.n for r in admitted)
                if req.params.n > free or (admitted and tokens + len(req.prompt_ids) > self.max_prefill_tokens):
                    break
                self._waiting.popleft()
                admitted.append(req)
                tokens += len(req.prompt_ids)
        return admitted

    def _prefill(self, reqs: list[_Request]) -> None:
        model = self.model
        device = self.device
        lens = [len(r.prompt_ids) for r in reqs]
        batch = torch.zeros(len(reqs), max(lens), dtype=torch.long)
        # the prompts' first samples take consecutive slots, so that the prefill's rows are one
        # range of the cache (compiled: the graphs `warmup` made, which read the range as a view;
        # scattered slots would be other graphs, compiled while requests wait); a prompt's other
        # samples follow, copied from its first
        first = len(self._running)
        for b, r in enumerate(reqs):
            batch[b, : lens[b]] = torch.tensor(r.prompt_ids)
            r.seqs[0].slot = first + b
            self._running.append(r.seqs[0])
        for r in reqs:
            for seq in r.seqs[1:]:
                seq.slot = len(self._running)
                self._running.append(seq)
        slots = torch.arange(first, first + len(reqs))
        self.cache.reset(slots)
        greedy = all(r.params.temperature == 0 for r in reqs)
        choice = drafts = None
        if self._compiled_prefill(max(lens)):
            # every row the longest prompt's length: a shorter one's padding is written to the cache
            # past the row's end, where no query of it sees it (keys are visible up to a query's own
            # position) and its decode steps write over it; its length is set to the real one
            lens_d, rows_d = torch.tensor(lens, device=device), slice(first, first + len(reqs))
            # one prompt at the first row: the prefill compiled ahead of time, where it applies
            aot = (self._aot_prefill_step() if len(reqs) == 1 and first == 0 and (greedy or not self.spec_steps)
                   else None)
            aot = aot if aot is not None and aot.applies(max(lens)) else None
            step = None if aot else CacheStep.make(self.cache, len(reqs), max(lens), slots, None, device)
            if greedy and self._greedy_cycle is not None:
                # speculative: the MTP layer's prefill and the first cycle's drafts in the same
                # compiled call (`greedy_cycle`); the MTP cache holds every prompt pair and the
                # first token's after it, its length set below
                if aot:
                    choice, lp, drafts, hidden, routed = aot(batch.to(device), lens_d - 1)
                else:
                    self.mtp_cache.reset(slots)
                    # (a slots tensor of its own: the graphs have two, and dynamo guards on their aliasing)
                    mtp_step = CacheStep.make(self.mtp_cache, len(reqs), max(lens), slots.clone(), None, device)
                    choice, lp, drafts, hidden, routed = self._greedy_cycle(model, batch.to(device), step, mtp_step,
                                                                            self.spec_steps, lens_d - 1)
                self.mtp_cache.lens[rows_d] = lens_d  # (what `copy_slots` below copies)
                drafts = drafts.tolist()
            else:
                logits, choice, lp, hidden, routed = aot(batch.to(device)) if aot else self._forward(
                    model, batch.to(device), step)
            self.cache.lens[rows_d] = lens_d
        else:
            out = model(batch.to(device), cache=self.cache, slots=slots.to(device), input_lens=torch.tensor(lens))
            logits, hidden, routed = out.logits, out.hidden, out.routed_experts
        last = torch.arange(len(reqs)), torch.tensor(lens) - 1  # each prompt's last position
        self.stats["prompt_tokens"] += sum(lens)
        self.stats["prefills"] += 1
        if self.spec_steps and drafts is None:
            self._mtp_prefill(batch, lens, hidden, slots)
        rows, seqs, params = [], [], []
        src, dst = [], []  # the other samples of a prompt start from its first one's caches
        for r in reqs:
            src += [r.seqs[0].slot] * (len(r.seqs) - 1)
            dst += [s.slot for s in r.seqs[1:]]
        if dst:  # one copy per layer tensor for the whole prefill, not one per request
            for cache in (self.cache, self.mtp_cache) if self.spec_steps else (self.cache,):
                cache.copy_slots(src, dst)
        for b, r in enumerate(reqs):
            for seq in r.seqs:
                if r.params.return_routed_experts:
                    seq.routed.append(routed[b, : lens[b]].to(torch.int16))
                if self.spec_steps:  # the last pair waits for the first sampled token
                    seq.mtp_h, seq.mtp_ids = hidden[b, lens[b] - 1: lens[b]], []
                    seq.drafts = drafts[b] if drafts is not None else None
                rows.append(b)
                seqs.append(seq)
                params.append(r.params)
        if drafts is not None:  # each sequence's last pair is in the MTP cache already, with the drafts it made
            self.mtp_cache.lens[torch.tensor([s.slot for s in seqs], device=device)] = torch.tensor(
                [lens[b] - 1 for b in rows], device=device)
        if greedy and choice is not None:  # the choices and their log-probs reduced in the graph
            ids, lps = choice[last][rows], lp[last][rows]
        else:
            ids, lps = sample(logits[last][rows], params, [s.rng for s in seqs])
        self._accept(seqs, ids.tolist(), lps.tolist())
        if self.spec_steps:
            for seq in seqs:
                if seq.output_ids:
                    seq.mtp_ids.append(seq.output_ids[-1])

    def _mtp_prefill(self, batch_RP: Tensor, lens: list[int], hidden_RPD: Tensor, slots_R: Tensor) -> None:
        """Speculative decoding: the MTP layer's cache takes each prompt's pairs (h_t, token t+1),
        t < P - 1, with the prefill and batched as it is, so that a sequence's first
        cycle catches up one pair (the prompt's last hidden state and the first sampled token), not
        the whole prompt: drafting then always runs on a few tokens a row (no compiled graph for
        prompt-length catch-ups, which `warmup` could not foresee) and a new batch's rows are
        alike (the compiled draft chain takes them). Compiled, as `_prefill` (rows padded)."""
        self.mtp_cache.reset(slots_R)
        T = max(lens) - 1
        if T < 1:  # one-token prompts only: no pair yet
            return
        device = self.device
        compiled = self._compiled_prefill(T)
        # eager, the rows with pairs; compiled, every row (a one-token prompt's only padding, its
        # length 0), so that the slots stay the prefill's one range (the graphs of `warmup`)
        rows = list(range(len(lens))) if compiled else [b for b, P in enumerate(lens) if P > 1]
        # (gathered even when every row is taken: contiguous inputs, as at warm-up; views of the
        # prompt-length tensors would fail the compiled graphs' stride guards and recompile)
        R = torch.tensor(rows)
        n_R, slots = torch.tensor([lens[b] - 1 for b in rows]), slots_R[R].to(device)
        # (its outputs are not used: the MLP and the head over one position a row, `keep_B`)
        self.model.mtp_forward(hidden_RPD[R.to(hidden_RPD.device), :T], batch_RP[R, 1:T + 1].to(device),
                               cache=self.mtp_cache, slots=slots, input_lens=None if compiled else n_R,
                               layers_fn=self._mtp_layers if compiled else None,
                               keep_B=torch.zeros(len(rows), dtype=torch.long, device=device))
        if compiled:  # the padding is written past each row's end, as in `_prefill`
            self.mtp_cache.lens[slots] = n_R.to(device)

    def _compiled_prefill(self, T: int) -> bool:
        """Whether a prefill of rows of T tokens runs compiled: with compile_decode, for 2 to
        DECODE_ATTENTION_MAX_T tokens a row, the token counts whose graphs `warmup` compiles —
        those of verification, the same graphs where the engine is speculative (a size of 1 would
        be a graph of its own, and longer prompts attend with SDPA, whose graphs would add to the
        warm-up what they save)."""
        return 2 <= T <= self._prefill_max_t

    def _prefill_shapes(self) -> list[tuple[int, int]]:
        """(rows, tokens a row) of a compiled prefill, one in each regime that its graphs have:
        batch 1 or more (dynamo specialises a size of 1), times each side of every switch of the
        model (`Glm4MoeForCausalLM.token_switches`) for the rows x tokens of the main model's
        forward and, in a greedy speculative prefill (`greedy_cycle`), for the rows alone of the
        MTP layer's one-token drafts — with T in [2, DECODE_ATTENTION_MAX_T] and up to max_batch
        rows."""
        switches, shapes, seen = self.model.token_switches(), [], set()
        for T in range(2, self._prefill_max_t + 1):
            firsts = {1, 2} | {-(-n // t) for n in switches for t in (T, 1)}
            for B in sorted(b for b in firsts if b <= self.max_batch):
                regime = (B == 1, tuple(B >= n for n in switches), tuple(B * T >= n for n in switches))
                if regime not in seen:
                    seen.add(regime)
                    shapes.append((B, T))
        return shapes

    def _decode(self) -> None:
        if self.spec_steps:
            k = min([self.spec_steps] + [min(self.max_len - len(s.req.prompt_ids) - len(s.output_ids),
                                             s.req.params.max_new_tokens - len(s.output_ids)) - 1
                                         for s in self._running])
            if k >= 1:
                return self._decode_speculative(k)
        seqs = list(self._running)
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs])
        device = self.device
        params, B = [s.req.params for s in seqs], len(seqs)
        if self._forward is not None:  # running[i].slot == i
            lens_B = self.cache.lens[:B]
            num_keys = int(lens_B.max()) + 1
            if self._aot_step() is not None and self._aot.applies(num_keys):
                out = self._aot(ids.to(device), lens_B[:, None], num_keys)
            else:
                out = self._forward(self.model, ids.to(device), CacheStep.rows(self.cache, lens_B.tolist(), 1, device))
            logits, choice_B1, lp_B1, hidden, routed = out
            self.cache.lens[:B] += 1
        else:
            out = self.model(ids.to(device), cache=self.cache, slots=torch.arange(B, device=device))
            logits, hidden, routed, choice_B1 = out.logits, out.hidden, out.routed_experts, None
        if choice_B1 is not None and all(p.temperature == 0 for p in params):  # reduced in the graph
            ids, lps = choice_B1[:, 0], lp_B1[:, 0]
        else:
            ids, lps = sample(logits[:, -1], params, [s.rng for s in seqs])
        for b, seq in enumerate(seqs):
            if seq.req.params.return_routed_experts:
                seq.routed.append(routed[b].to(torch.int16))
            if self.spec_steps:
                seq.mtp_h, seq.drafts = torch.cat([seq.mtp_h, hidden[b]]), None
        self._accept(seqs, ids.tolist(), lps.tolist())
        if self.spec_steps:
            for seq in seqs:
                seq.mtp_ids.append(seq.output_ids[-1])

    def _aot_step(self) -> AOTStep | None:
        """The ahead-of-time compiled decode step, built on first use (None where it does not apply
        or could not be built)."""
        if self._aot_wanted:
            self._aot_wanted = False
            self._aot = AOTStep.build(self.model, [self.cache], self.max_batch, decode_forward)
        return self._aot

    def _aot_cycle_step(self) -> AOTStep | None:
        """The ahead-of-time compiled greedy cycle of `spec_steps` drafts, built on first use."""
        if self._aot_cycle_wanted:
            self._aot_cycle_wanted = False
            k = self.spec_steps
            self._aot_cycle = AOTStep.build(self.model, [self.cache, self.mtp_cache], self.max_batch, greedy_cycle,
                                            T=k + 1, static=(k,), batch_args=1)
        return self._aot_cycle

    def _aot_prefill_step(self) -> AOTPrefill | None:
        """The ahead-of-time compiled prefill of one prompt at the cache's first row, built on first
        use: a plain engine's `decode_forward`, a speculative one's greedy `greedy_cycle` (sampled
        prefills stay torch.compile'd). For prompts of 2 tokens up to the compiled prefill's
        longest (`_prefill_max_t`), short of every switch of the model's path
        (`Glm4MoeForCausalLM.token_switches`) and of the cache's end (`aot._max_keys`: the
        cycle's further drafts read k - 1 keys more); the torch.compile'd functions take the rest."""
        if self._aot_prefill_wanted:
            self._aot_prefill_wanted = False
            k, caches = self.spec_steps, [self.cache] + ([self.mtp_cache] if self.spec_steps else [])
            hi = min([self._prefill_max_t, self.max_len - max(1, k)] + [n - 1 for n in self.model.token_switches()])
            if hi > 2:  # (a range of one length would be a static size: export refuses it)
                self._aot_prefill = AOTPrefill.build(self.model, caches, greedy_cycle if k else decode_forward, 2, hi,
                                                     static=(k,) if k else (), batch_args=1 if k else 0)
        return self._aot_prefill

    def _decode_speculative(self, k: int) -> None:
        """MTP speculative decoding (Leviathan et al. 2023; Chen et al. 2023): the MTP layer drafts k
        tokens one after another, the main model scores all of them in one forward, and each draft
        is kept with probability min(1, p/q) — exact agreement for greedy — the first rejected one
        replaced by a sample of max(0, p - q), a bonus token from p when all are kept. The output
        has the distribution of plain decoding. Drafts after the first feed the MTP layer its own
        output hidden state, as SGLang and vLLM do with GLM-4.5's MTP layer."""
        model, seqs = self.model, list(self._running)
        B, device = len(seqs), self.device
        params = [s.req.params for s in seqs]
        rngs = [s.rng for s in seqs]
        # 1. catch the MTP cache up with the pairs of the last step; its last position drafts d1
        n_new = [len(s.mtp_ids) for s in seqs]
        all_greedy = all(p.temperature == 0 for p in params)
        compiled_chain = self._greedy_drafts is not None and all_greedy and k == self.spec_steps
        # compiled and greedy: the cycle ends in `greedy_cycle` (verification and the next drafts),
        # so this cycle's drafts are ready unless a row is new (or the last cycle was another kind)
        ready = compiled_chain and all(s.drafts is not None for s in seqs)
        # the compiled chain pads every catch-up to 2 pairs at least: dynamo specialises a size of
        # 1, and this keeps it at one graph a batch-size regime
        T = max(n_new + [2]) if compiled_chain else max(n_new)
        uniform = min(n_new) == T  # no row padded
        if ready:
            drafts_l = [s.drafts for s in seqs]
        else:
            if uniform:
                h = torch.stack([s.mtp_h for s in seqs]).to(device)
                ids = torch.tensor([s.mtp_ids for s in seqs])
            else:
                h = torch.zeros(B, T, model.config.hidden_size, dtype=seqs[0].mtp_h.dtype, device=device)
                ids = torch.zeros(B, T, dtype=torch.long)
                for b, s in enumerate(seqs):
                    h[b, : n_new[b]] = s.mtp_h
                    ids[b, : n_new[b]] = torch.tensor(s.mtp_ids)
            if compiled_chain:
                # compiled, greedy: the whole draft chain in one compiled call (ragged rows padded)
                step = CacheStep.rows(self.mtp_cache, self.mtp_cache.lens[:B].tolist(), T, device)
                last_B = (torch.tensor(n_new) - 1).to(device)
                drafts_Bk = self._greedy_drafts(model, h, ids.to(device), step, k, last_B).cpu()
            else:
                # (compiled only when no row is padding: a ragged cache write has a data-dependent shape;
                # the MLP and the head over each row's last pair only, `keep_B`, past one pair a row)
                slots = torch.arange(B, device=device)
                last = (torch.tensor(n_new) - 1).to(device) if T > 1 else None
                out = model.mtp_forward(h, ids.to(device), cache=self.mtp_cache, slots=slots, input_lens=torch.tensor(n_new),
                                        layers_fn=self._mtp_layers if uniform else None, keep_B=last)
                logits, g = out.logits[:, 0], out.hidden[:, 0]
                drafts, q_probs = [], []
                for i in range(k):
                    d, q = self._draft(logits, params, rngs)
                    drafts.append(d)
                    q_probs.append(q)
                    if i + 1 < k:
                        out = model.mtp_forward(g[:, None], d[:, None].to(device), cache=self.mtp_cache, slots=slots,
                                                layers_fn=self._mtp_layers)
                        logits, g = out.logits[:, -1], out.hidden[:, -1]
                drafts_Bk = torch.stack(drafts, 1).cpu()
            drafts_l = drafts_Bk.tolist()
        # 2. verify: the pending token and the k drafts in one forward of the main model (ids made in one op)
        verify_ids = torch.tensor([[s.output_ids[-1]] + d for s, d in zip(seqs, drafts_l)], device=device)
        L = self.cache.lens[:B].tolist()
        next_drafts = None
        if compiled_chain:  # (`greedy_cycle` is compiled with `greedy_drafts`) and the next cycle's drafts
            # (the MTP cache's lengths are those of the main cache before this cycle: see below)
            cycle, num_keys = self._aot_cycle_step(), max(L) + k + 1
            last_B = torch.full((B,), -1, device=device)  # (compiled_chain: k is spec_steps, the cycle's own)
            if cycle is not None and cycle.applies(num_keys):  # (positions made in one op: no CacheStep)
                out = cycle(verify_ids, torch.tensor([[n + t for t in range(k + 1)] for n in L], device=device),
                            num_keys, last_B)
            else:
                out = self._greedy_cycle(model, verify_ids, CacheStep.rows(self.cache, L, k + 1, device),
                                         CacheStep.rows(self.mtp_cache, L, k + 1, device), k, last_B)
            target_Bk1, target_lp_Bk1, next_drafts, ver_hidden, ver_routed = out
            next_drafts = next_drafts.tolist()
        elif self._forward is not None:  # compiled (the cache lengths are set below)
            step = CacheStep.rows(self.cache, L, k + 1, device)
            v_logits, target_Bk1, target_lp_Bk1, ver_hidden, ver_routed = self._forward(model, verify_ids, step)
        else:
            ver = model(verify_ids, cache=self.cache, slots=torch.arange(B, device=device))
            v_logits, ver_hidden, ver_routed, target_Bk1 = ver.logits, ver.hidden, ver.routed_experts, None
        if target_Bk1 is not None and all_greedy:  # reduced in the graph
            target_lp = target_lp_Bk1.tolist()
        else:
            p_logits = v_logits.float()                                       # [B, k+1, V]
            temps = torch.tensor([p.temperature for p in params], device=p_logits.device)
            scaled = p_logits / torch.where(temps == 0, 1.0, temps)[:, None, None]
            logprobs_all = scaled.log_softmax(-1)
            # greedy rows: the main model's choice at each position, and its log-prob
            target_Bk1 = p_logits.argmax(-1)
            target_lp = logprobs_all.gather(-1, target_Bk1[..., None])[..., 0].tolist()
        target = target_Bk1.tolist()
        # 3. accept or reject each sequence's drafts
        emits, new_lens = [], []
        for b, seq in enumerate(seqs):
            pr = params[b]
            if pr.temperature == 0:  # keep the drafts that equal the main model's choice, then its choice
                accepted = 0
                while accepted < k and drafts_l[b][accepted] == target[b][accepted]:
                    accepted += 1
                tokens, lps = target[b][: accepted + 1], target_lp[b][: accepted + 1]
            else:
                accepted = 0
                new_token = None
                for i in range(k):
                    d = drafts_l[b][i]
                    p = self._target_probs(logprobs_all[b, i], pr)
                    q = q_probs[i][b]
                    if rngs[b].next() * q[d] <= p[d]:   # accept with prob min(1, p/q)
                        accepted += 1
                        continue
                    residual = (p - q).clamp(min=0)
                    new_token = _draw_one(residual if residual.sum() > 0 else p, rngs[b])
                    break
                if new_token is None:  # every draft kept: a bonus token from the last position
                    new_token = _draw_one(self._target_probs(logprobs_all[b, k], pr), rngs[b])
                tokens = drafts_l[b][:accepted] + [new_token]
                lps = logprobs_all[b, torch.arange(accepted + 1), torch.tensor(tokens)].tolist()
            # the cache keeps the pending token and the accepted drafts; the MTP cache what it had
            # (after `greedy_cycle` these pairs are in it already, and written again, the same,
            # should the next cycle draft without the drafts it made)
            new_lens.append(L[b] + accepted + 1)
            seq.mtp_h = ver_hidden[b, : accepted + 1]
            seq.mtp_ids = tokens[:]
            seq.drafts = next_drafts[b] if next_drafts is not None else None
            if pr.return_routed_experts:
                seq.routed.append(ver_routed[b, : accepted + 1].to(torch.int16))
            emits.append((seq, tokens, lps))
        self.cache.lens[:B] = torch.tensor(new_lens)
        self.mtp_cache.lens[:B] = torch.tensor(L)
        # only now finish sequences (each sequence's cache lengths are set above)
        for seq, tokens, lps in emits:
            self._accept_run(seq, tokens, lps)
        st = self.stats
        st["spec_verify_steps"] += B
        st["spec_emitted_tokens"] += sum(len(t) for _, t, _ in emits)
        st["spec_accept_length"] = st["spec_emitted_tokens"] / st["spec_verify_steps"]

    @staticmethod
    def _target_probs(logprobs_V: Tensor, p: SamplingParams) -> Tensor:
        """The sampling distribution: softmax after temperature, then top-k / top-p / min-p."""
        probs = logprobs_V.exp()[None]
        if p.top_k > 0 or p.top_p < 1 or p.min_p > 0:
            probs = _filter_probs(probs, *_filters([p], probs.device))
        return (probs / probs.sum())[0]

    def _draft(self, logits_BV: Tensor, params: list[SamplingParams],
               rngs: list[RandomStream]) -> tuple[Tensor, Tensor | None]:
        """Draft tokens [B] from MTP logits, and the draft distributions q [B, V] for rejection
        sampling (None when every row is greedy: acceptance then compares ids only)."""
        logits = logits_BV.float()
        if all(p.temperature == 0 for p in params):  # greedy: the choice alone (acceptance compares ids)
            return logits.argmax(-1), None
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        q = (logits / torch.where(temps == 0, 1.0, temps)[:, None]).softmax(-1)
        d = logits.argmax(-1)
        for b, p in enumerate(params):
            if p.temperature > 0:
                q[b] = self._target_probs(q[b].log(), p)
                d[b] = _draw_one(q[b], rngs[b])
        return d, q

    def _compact(self) -> None:
        """Close the holes finished sequences left, so that running[i].slot == i again: the last
        running sequences move into them, with one cache copy per layer for all of them (moving
        each at its finish cost 8 small copies per sequence: ~8% of a busy server's time)."""
        n = sum(s.slot >= 0 for s in self._running)
        if n == len(self._running):
            return
        movers = [s for s in self._running[n:] if s.slot >= 0]
        holes = [i for i, s in enumerate(self._running[:n]) if s.slot < 0]
        if movers:
            src = [s.slot for s in movers]
            self.cache.copy_slots(src, holes)
            if self.mtp_cache is not None:
                self.mtp_cache.copy_slots(src, holes)
            for s, i in zip(movers, holes):
                # (a mover's MTP pairs past its cache length, which `greedy_cycle` wrote, stay
                # behind: its next cycle drafts from its pairs again)
                s.slot, s.drafts = i, None
        self._running = sorted((s for s in self._running if s.slot >= 0), key=lambda s: s.slot)

    def _accept(self, seqs: list[_Seq], ids: list[int], logprobs: list[float]) -> None:
        """One new token for each of `seqs`."""
        self.stats["generated_tokens"] += len(seqs)
        for seq, t, lp in zip(seqs, ids, logprobs):
            self._append(seq, t, lp)
        for req in {s.req for s in seqs if s.req.on_progress is not None}:
            req.on_progress(req)

    def _accept_run(self, seq: _Seq, ids: list[int], logprobs: list[float]) -> None:
        """A speculative cycle's tokens for one sequence, in order, up to its finish."""
        for t, lp in zip(ids, logprobs):
            self.stats["generated_tokens"] += 1
            if self._append(seq, t, lp):
                break
        if seq.req.on_progress is not None:
            seq.req.on_progress(seq.req)

    def _append(self, seq: _Seq, t: int, lp: float) -> bool:
        """Append a token to a sequence and finish it where the token ends it; whether it did."""
        p = seq.req.params
        if p.max_new_tokens == 0:
            self._finish(seq, "length", None)
            return True
        seq.output_ids.append(t)
        seq.logprobs.append(lp)
        if t in p.stop_token_ids or (not p.ignore_eos and t in self.eos_ids):
            self._finish(seq, "stop", t)
        elif len(seq.output_ids) >= p.max_new_tokens or len(seq.req.prompt_ids) + len(seq.output_ids) >= self.max_len:
            self._finish(seq, "length", None)
        else:
            return False
        return True

    def _finish(self, seq: _Seq, reason: str, matched: int | None) -> None:
        req = seq.req
        seq.slot = -1  # its slot is a hole in `_running` until `_compact`
        routed = torch.cat(seq.routed) if seq.routed else None
        out = Output(req.id, seq.index, req.prompt_ids, seq.output_ids, seq.logprobs, reason, matched,
                     self.weight_version, routed)
        self.stats["finished"] += 1
        if all(o is not None or s is seq for o, s in zip(req.outputs, req.seqs)):
            with self._submit:
                self._requests.pop(req.id, None)
        req.finish_one(out)


