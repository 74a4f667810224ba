"""The engine as an HTTP service: SGLang's native API, the OpenAI API, and Prometheus metrics.

The native API mirrors SGLang's, so that the same RL code drives this server and SGLang:
`POST /generate` (text or input_ids, sampling_params, return_logprob; `meta_info` carries
`output_token_logprobs` as `[logprob, token_id, None]` entries, the finish reason and the weight
version), `/health`, `/health_generate`, `/get_model_info`, `/get_server_info`, `/flush_cache`,
`/abort_request`, `/pause_generation`, `/continue_generation`, `/update_weights_from_disk`,
`/update_weights_from_tensor`, `/init_weights_update_group`, `/update_weights_from_distributed`.

Deviation from SGLang: `/update_weights_from_tensor` takes `serialized_named_tensors` as base64 of
`torch.save([(name, tensor), ...])` (read back with `weights_only=True`), not SGLang's own serializer.

Bad requests get a 4xx JSON error naming the field; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
import uuid
from typing import Any, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rlfoundry.rollout.engine import Engine, Output, RequestError, SamplingParams

# Sampling fields SGLang clients send that this engine does not implement: accepted only at the
# value that means "off", so that those clients work and nobody gets a silently ignored penalty.
_OFF_ONLY = dict(frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SglSamplingParams(_Strict):
    max_new_tokens: int = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0, le=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1)
    sampling_seed: int | None = None
    seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0


class GenerateRequest(_Strict):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SglSamplingParams | list[SglSamplingParams] = Field(default_factory=SglSamplingParams)
    """One for all prompts, or (a batch) one per prompt, as in SGLang."""
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    # fields sglang-router and SGLang clients add; their defaults are what this server does
    model: str | None = None
    log_metrics: bool = True
    no_logs: bool = False
    background: bool = False
    return_hidden_states: bool = False
    return_bytes: bool = False
    return_entropy: bool = False
    lora_path: str | list[str] | None = None
    image_data: Any = None
    custom_logit_processor: str | None = None
    data_parallel_rank: int | None = None


class UpdateFromDisk(_Strict):
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True


class UpdateFromTensor(_Strict):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None
    abort_all_requests: bool = False


class InitGroup(_Strict):
    master_address: str
    master_port: int
    rank_offset: int = Field(1, ge=1)
    world_size: int = Field(..., ge=2)
    group_name: str = "weight_update_group"
    backend: Literal["gloo", "nccl"] = "gloo"


class UpdateFromDistributed(_Strict):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: str | None = None
    abort_all_requests: bool = False
    load_format: Literal["flattened_bucket"] | None = None
    """None: one broadcast per tensor, in order. "flattened_bucket" (as SGLang): the tensors of each
    dtype, flattened and concatenated in order, arrive as one broadcast per dtype (dtypes in order of
    first appearance)."""


class AbortRequest(_Strict):
    rid: str = ""
    abort_all: bool = False


class PauseRequest(_Strict):
    mode: Literal["in_place", "abort", "retract"] = "in_place"


# OpenAI API ------------------------------------------------------------------------------------
class _OpenAI(BaseModel):
    # the OpenAI client sends fields we do not model (user, logit_bias, ...): validate what we use
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class CompletionRequest(_OpenAI):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "observation", "tool"]
    content: str


class ChatRequest(_OpenAI):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False


class _Metrics:
    def __init__(self):
        self.requests = 0
        self.errors = 0
        self.started = time.time()


def create_app(engine: Engine, tokenizer=None, model_path: str = "", served_model_name: str | None = None,
               start_engine: bool = True) -> FastAPI:
    """The FastAPI app around an engine, whose loop it starts in a background thread unless told
    not to (`rlfoundry serve` runs the loop on its main thread instead: see `Engine.run`)."""
    if start_engine:
        engine.start()
    name = served_model_name or model_path or "rlfoundry"
    app = FastAPI(title="rlfoundry engine server", version="0.1.0",
                  description="SGLang-compatible native API and OpenAI API over the rlfoundry engine")
    metrics = _Metrics()
    groups: dict[str, tuple[Any, torch.device]] = {}  # name -> (process group, where its tensors arrive)
    update_lock = asyncio.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.errors += 1
        details = [{"field": ".".join(str(p) for p in e["loc"][1:]), "message": e["msg"]} for e in exc.errors()]
        msg = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return JSONResponse(status_code=400, content={"error": {"message": msg, "type": "invalid_request_error",
                                                                "details": details}})

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError):
        metrics.errors += 1
        return JSONResponse(status_code=400, content={"error": {"message": str(exc), "type": "invalid_request_error"}})

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        metrics.errors += 1
        return JSONResponse(status_code=exc.status_code, content={"error": {"message": exc.detail,
                                                                            "type": "invalid_request_error"}})

    # ---------------------------------------------------------------- helpers
    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise RequestError("this server has no tokenizer: send input_ids instead of text")
        return tokenizer.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""

    def stop_ids(stop: str | list[str] | None) -> list[int]:
        """Stop strings that are single tokens become stop token ids; others are refused."""
        if not stop:
            return []
        out = []
        for s in [stop] if isinstance(stop, str) else stop:
            ids = encode(s)
            if len(ids) != 1:
                raise RequestError(f"stop: only strings that are one token are supported, {s!r} is {len(ids)}")
            out.append(ids[0])
        return out

    async def run(prompt_ids: list[int], params: SamplingParams, rid: str | None = None) -> list[Output]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        req = engine.add_request(prompt_ids, params, rid,
                                 on_done=lambda r: loop.call_soon_threadsafe(
                                     lambda: done.done() or done.set_result(r.outputs)))
        try:
            return await done
        except asyncio.CancelledError:  # the client went away: stop working for it
            engine.abort(req.id)
            raise

    def sgl_params(sp: SglSamplingParams, extra_stop: list[int] | None = None) -> SamplingParams:
        for field, default in _OFF_ONLY.items():
            if getattr(sp, field) != default:
                raise RequestError(f"sampling_params.{field} is not supported (only {default!r})")
        return SamplingParams(max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                              top_k=sp.top_k, min_p=sp.min_p, ignore_eos=sp.ignore_eos, n=sp.n,
                              stop_token_ids=list(sp.stop_token_ids or []) + stop_ids(sp.stop),
                              seed=sp.sampling_seed if sp.sampling_seed is not None else sp.seed)

    def finish_reason(o: Output) -> dict:
        if o.finish_reason == "stop":
            return {"type": "stop", "matched": o.matched_stop}
        if o.finish_reason == "length":
            return {"type": "length", "length": len(o.output_ids)}
        return {"type": "abort", "message": "aborted"}

    # ---------------------------------------------------------------- native API
    @app.post("/generate")
    async def generate(body: GenerateRequest):
        metrics.requests += 1
        if body.stream:
            raise RequestError("stream: streaming is offered on /v1/completions and /v1/chat/completions")
        if body.top_logprobs_num:
            raise RequestError("top_logprobs_num: only 0 is supported")
        for field in ("background", "return_hidden_states", "return_bytes", "return_entropy"):
            if getattr(body, field):
                raise RequestError(f"{field}: not supported")
        for field in ("lora_path", "image_data", "custom_logit_processor"):
            if getattr(body, field) is not None:
                raise RequestError(f"{field}: not supported")
        if (body.text is None) == (body.input_ids is None):
            raise RequestError("give exactly one of text and input_ids")
        sp = body.sampling_params
        if body.input_ids is not None:
            batch = isinstance(body.input_ids[0], list) if body.input_ids else False
            prompts = body.input_ids if batch else [body.input_ids]
        else:
            batch = isinstance(body.text, list)
            prompts = [encode(t) for t in (body.text if batch else [body.text])]
        rids = body.rid if isinstance(body.rid, list) else [body.rid] * len(prompts)
        if len(rids) != len(prompts):
            raise RequestError("rid: one id per prompt")
        if isinstance(sp, list) and (not batch or len(sp) != len(prompts)):
            raise RequestError(f"sampling_params: a list needs a batch of prompts and one entry per prompt, got "
                               f"{len(sp)} for {len(prompts) if batch else 'a single prompt'}")
        params = [sgl_params(s) for s in sp] if isinstance(sp, list) else [sgl_params(sp)] * len(prompts)
        for p in params:
            p.return_routed_experts = body.return_routed_experts
        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(p, ps, r) for p, ps, r in zip(prompts, params, rids)))
        items = []
        for outs, ps in zip(results, params):
            for o in outs:
                meta = {"id": o.request_id if ps.n == 1 else f"{o.request_id}-{o.index}",
                        "finish_reason": finish_reason(o), "prompt_tokens": len(o.prompt_ids),
                        "completion_tokens": len(o.output_ids), "cached_tokens": 0,
                        "weight_version": o.weight_version, "e2e_latency": time.perf_counter() - t0}
                if body.return_logprob:
                    meta["output_token_logprobs"] = [[lp, t, decode([t]) if body.return_text_in_logprobs else None]
                                                     for lp, t in zip(o.logprobs, o.output_ids)]
                    meta["input_token_logprobs"] = []
                if o.routed_experts is not None:
                    meta["routed_experts"] = o.routed_experts.tolist()
                items.append({"text": decode(o.output_ids), "output_ids": o.output_ids, "meta_info": meta})
        # a JSONResponse as it is: FastAPI would first walk every logprob entry in jsonable_encoder
        return JSONResponse(items if batch or params[0].n > 1 else items[0])

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/health_generate")
    async def health_generate():
        if engine.paused:  # a paused engine is alive; generating would wait for continue
            return PlainTextResponse("")
        outs = await run([0], SamplingParams(max_new_tokens=1, temperature=0))
        if not outs or outs[0] is None:
            raise HTTPException(503, "generation failed")
        return PlainTextResponse("")

    def model_info() -> dict:
        return {"model_path": model_path, "tokenizer_path": model_path if tokenizer is not None else None,
                "is_generation": True, "weight_version": engine.weight_version,
                "has_image_understanding": False, "has_audio_understanding": False, "model_type": "glm4_moe",
                "architectures": ["Glm4MoeForCausalLM"]}

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info():
        return model_info()

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info():
        load = engine.load()
        return {"model_path": model_path, "served_model_name": name, "version": "rlfoundry-0.1.0",
                "weight_version": engine.weight_version, "max_total_num_tokens": load["kv_capacity_tokens"],
                "max_running_requests": engine.max_batch, "context_length": engine.max_len,
                "max_req_input_len": engine.max_len - 1, "paused": engine.paused,
                "torch_threads": torch.get_num_threads(),
                "device": str(engine.device), "batch_invariant": engine.model.batch_invariant,
                "dtype": str(engine.dtype).removeprefix("torch."),
                "internal_states": [{"load": load, "stats": dict(engine.stats)}], **model_info()}

    @app.get("/get_load")
    async def get_load():
        load = engine.load()
        return [{"dp_rank": 0, "num_reqs": load["running"] + load["waiting"], "num_waiting_reqs": load["waiting"],
                 "num_tokens": load["kv_used_tokens"]}]

    @app.post("/flush_cache")
    @app.get("/flush_cache")
    async def flush_cache():
        if not engine.flush_cache():
            return PlainTextResponse("Cache not flushed: requests are running", status_code=400)
        return PlainTextResponse("Cache flushed.")

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest):
        if body.abort_all:
            engine.abort_all()
        elif body.rid:
            engine.abort(body.rid)
        return {"success": True}

    @app.post("/pause_generation")
    async def pause_generation(body: PauseRequest | None = None):
        if body is not None and body.mode == "abort":
            engine.abort_all()
        engine.pause()
        return {"success": True, "message": "paused"}

    @app.post("/continue_generation")
    async def continue_generation():
        engine.resume()
        return {"success": True, "message": "continued"}

    async def apply_update(source, version, abort_all: bool) -> dict:
        async with update_lock:
            if abort_all:
                engine.abort_all()
            try:
                n = await asyncio.to_thread(engine.update_weights, source, version)
            except (ValueError, OSError) as e:  # bad names, shapes or paths: nothing else changes
                return JSONResponse(status_code=400, content={"success": False, "message": str(e)})
            return {"success": True, "message": f"updated {n} tensors", "weight_version": engine.weight_version,
                    "num_paused_requests": 0}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: UpdateFromDisk):
        return await apply_update(body.model_path, body.weight_version, body.abort_all_requests)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(body: UpdateFromTensor):
        tensors = []
        try:
            for blob in body.serialized_named_tensors:
                tensors.extend(torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True))
        except Exception as e:
            raise RequestError(f"serialized_named_tensors: not base64 of torch.save([(name, tensor), ...]) ({e})")
        return await apply_update(tensors, body.weight_version, body.abort_all_requests)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(body: InitGroup):
        """Join the trainer's group. gloo broadcasts CPU tensors (copied onto the engine's device
        as they are applied), NCCL CUDA ones straight onto the engine's GPU: NCCL needs an engine
        on a GPU (and the sender on another GPU: NCCL takes one rank per GPU)."""
        import torch.distributed as dist

        device = engine.device
        if body.backend == "nccl" and device.type != "cuda":
            return JSONResponse(status_code=400, content={"success": False, "message": (
                f"backend: nccl moves CUDA tensors and this engine computes on {device}; use gloo")})

        def connect():
            store = dist.TCPStore(body.master_address, body.master_port, body.world_size, is_master=False,
                                  timeout=__import__("datetime").timedelta(seconds=120))
            if body.backend == "gloo":
                return dist.ProcessGroupGloo(store, body.rank_offset, body.world_size), torch.device("cpu")
            torch.cuda.set_device(device)
            return dist.ProcessGroupNCCL(store, body.rank_offset, body.world_size), device

        try:
            groups[body.group_name] = await asyncio.to_thread(connect)
        except Exception as e:
            return JSONResponse(status_code=400, content={"success": False, "message": f"init failed: {e}"})
        return {"success": True, "message": f"joined {body.group_name} as rank {body.rank_offset}"}

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(body: UpdateFromDistributed):
        group, device = groups.get(body.group_name, (None, None))
        if group is None:
            raise RequestError(f"group_name: no weight update group {body.group_name!r}; call /init_weights_update_group")
        if not len(body.names) == len(body.dtypes) == len(body.shapes):
            raise RequestError("names, dtypes and shapes must have the same length")
        try:
            dtypes = [getattr(torch, d.removeprefix("torch.")) for d in body.dtypes]
        except AttributeError as e:
            raise RequestError(f"dtypes: {e}")

        def receive():
            if device.type == "cuda":  # this pool thread's current GPU, as NCCL's communicator has it
                torch.cuda.set_device(device)
            if body.load_format is None:
                out = []
                for n, dt, shape in zip(body.names, dtypes, body.shapes):
                    t = torch.empty(shape, dtype=dt, device=device)
                    group.broadcast(t, 0).wait()
                    out.append((n, t))
                return out
            views: list = [None] * len(body.names)
            for dt in dict.fromkeys(dtypes):  # one flat buffer per dtype, in order of first appearance
                idx = [i for i, d in enumerate(dtypes) if d == dt]
                sizes = [math.prod(body.shapes[i]) for i in idx]
                flat = torch.empty(sum(sizes), dtype=dt, device=device)
                group.broadcast(flat, 0).wait()
                for i, part in zip(idx, flat.split(sizes)):
                    views[i] = (body.names[i], part.view(body.shapes[i]))
            return views

        tensors = await asyncio.to_thread(receive)
        return await apply_update(tensors, body.weight_version, body.abort_all_requests)

    @app.get("/metrics")
    async def prometheus():
        load = engine.load()
        s = engine.stats
        up = time.time() - metrics.started
        lines = [
            "# TYPE rlfoundry_running_requests gauge", f"rlfoundry_running_requests {load['running']}",
            "# TYPE rlfoundry_queued_requests gauge", f"rlfoundry_queued_requests {load['waiting']}",
            "# TYPE rlfoundry_kv_cache_usage gauge",
            f"rlfoundry_kv_cache_usage {load['kv_used_tokens'] / max(load['kv_capacity_tokens'], 1):.6f}",
            "# TYPE rlfoundry_generated_tokens_total counter", f"rlfoundry_generated_tokens_total {s['generated_tokens']}",
            "# TYPE rlfoundry_prompt_tokens_total counter", f"rlfoundry_prompt_tokens_total {s['prompt_tokens']}",
            "# TYPE rlfoundry_generation_tokens_per_second gauge",
            f"rlfoundry_generation_tokens_per_second {s['generated_tokens'] / max(up, 1e-9):.3f}",
            "# TYPE rlfoundry_spec_accept_length gauge",
            f"rlfoundry_spec_accept_length {s.get('spec_accept_length', 0.0):.4f}",
            "# TYPE rlfoundry_requests_total counter", f"rlfoundry_requests_total {metrics.requests}",
            "# TYPE rlfoundry_request_errors_total counter", f"rlfoundry_request_errors_total {metrics.errors}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- OpenAI API
    def check_model(model: str) -> None:
        if model not in (name, model_path):
            raise HTTPException(404, f"model {model!r} is not served here; this server serves {name!r}")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(metrics.started),
                                            "owned_by": "rlfoundry", "root": model_path,
                                            "max_model_len": engine.max_len}]}

    def oa_params(body: _OpenAI, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_tokens if max_tokens is not None else 16,
                              temperature=body.temperature, top_p=body.top_p, n=body.n,
                              stop_token_ids=stop_ids(body.stop), seed=body.seed)

    def oa_finish(o: Output) -> str:
        return "length" if o.finish_reason == "length" else "stop"

    async def stream_choices(prompt_ids, params, make_chunk, final_chunk):
        """Server-sent events: a chunk per step with each sample's new tokens, a final chunk per
        sample, then [DONE]. A client that goes away aborts the request."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        req = engine.add_request(prompt_ids, params, on_done=lambda r: loop.call_soon_threadsafe(wake.set))
        req.on_progress = lambda r: loop.call_soon_threadsafe(wake.set)

        async def events():
            # text deltas: decode everything so far and send what is new, holding back a partly
            # decoded character (byte-level tokens can split one) until it completes
            sent, closed = [""] * params.n, set()
            try:
                while len(closed) < params.n:
                    await wake.wait()
                    wake.clear()
                    for seq in req.seqs:
                        out = req.outputs[seq.index]
                        text = decode(list(seq.output_ids) if out is None else out.output_ids)
                        if (out is not None or not text.endswith("\ufffd")) and len(text) > len(sent[seq.index]):
                            yield "data: " + json.dumps(make_chunk(seq.index, text[len(sent[seq.index]):])) + "\n\n"
                            sent[seq.index] = text
                        if out is not None and seq.index not in closed:
                            closed.add(seq.index)
                            yield "data: " + json.dumps(final_chunk(out)) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not req.done.is_set():
                    engine.abort(req.id)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        metrics.requests += 1
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [encode(p)]
        elif p and isinstance(p[0], int):
            prompts = [p]
        elif p and isinstance(p[0], list):
            prompts = p
        else:
            prompts = [encode(s) for s in p]
        params = oa_params(body, body.max_tokens)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise RequestError("prompt: streaming takes one prompt")
            return await stream_choices(
                prompts[0], params,
                lambda i, delta: {"id": cid, "object": "text_completion", "created": created, "model": name,
                                  "choices": [{"index": i, "text": delta, "logprobs": None, "finish_reason": None}]},
                lambda o: {"id": cid, "object": "text_completion", "created": created, "model": name,
                           "choices": [{"index": o.index, "text": "", "logprobs": None,
                                        "finish_reason": oa_finish(o)}]})
        results = await asyncio.gather(*(run(pr, params) for pr in prompts))
        choices, usage_p, usage_c = [], 0, 0
        for k, outs in enumerate(results):
            usage_p += len(prompts[k])
            for o in outs:
                usage_c += len(o.output_ids)
                lp = None
                if body.logprobs is not None:
                    lp = {"tokens": [decode([t]) for t in o.output_ids], "token_logprobs": o.logprobs,
                          "top_logprobs": None, "text_offset": None}
                text = (decode(prompts[k]) if body.echo else "") + decode(o.output_ids)
                choices.append({"index": len(choices), "text": text, "logprobs": lp, "finish_reason": oa_finish(o)})
        return {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": {"prompt_tokens": usage_p, "completion_tokens": usage_c,
                          "total_tokens": usage_p + usage_c}}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        metrics.requests += 1
        check_model(body.model)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise RequestError("messages: this server's checkpoint has no tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                               add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        params = oa_params(body, body.max_completion_tokens or body.max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return await stream_choices(
                prompt_ids, params,
                lambda i, delta: {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                                  "choices": [{"index": i, "delta": {"role": "assistant", "content": delta},
                                               "finish_reason": None}]},
                lambda o: {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [{"index": o.index, "delta": {}, "finish_reason": oa_finish(o)}]})
        outs = await run(prompt_ids, params)
        choices = []
        for o in outs:
            lp = None
            if body.logprobs:
                lp = {"content": [{"token": decode([t]), "logprob": l, "bytes": None, "top_logprobs": []}
                                  for t, l in zip(o.output_ids, o.logprobs)]}
            choices.append({"index": o.index, "message": {"role": "assistant", "content": decode(o.output_ids)},
                            "logprobs": lp, "finish_reason": oa_finish(o)})
        completion = sum(len(o.output_ids) for o in outs)
        return {"id": cid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                          "total_tokens": len(prompt_ids) + completion}}

    app.state.engine = engine
    return app
