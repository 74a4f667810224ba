"""Rollout clients: one interface over the engines the RL loop can drive.

`SGLangClient` speaks SGLang's native HTTP API — our own server, a real SGLang server, or
sglang-router in front of either. `VLLMClient` speaks vLLM's OpenAI server. Both take token ids in
and give token ids and log-probs out, so that trainer and engine see the same tokens.

`DistributedWeightSender` pushes weights from the trainer (rank 0) to SGLang-protocol engines over a
torch.distributed broadcast group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable

import torch


class RolloutError(RuntimeError):
    """An engine answered with an error (the message carries its status and body)."""


@dataclass
class Generation:
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str                 # "stop" | "length" | "abort"
    weight_version: str | None = None
    routed_experts: list | None = None
    meta: dict = field(default_factory=dict)


def _request(url: str, payload: dict | None, timeout: float, method: str) -> dict | str:
    """One HTTP call; a JSON answer decoded, any other text as is; HTTP errors raise RolloutError."""
    data = json.dumps(payload).encode() if payload is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        raise RolloutError(f"{url}: HTTP {e.code}: {e.read().decode()[:2000]}") from None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def _post(url: str, payload: dict | None, timeout: float) -> dict | str:
    return _request(url, payload, timeout, "POST")


def _get(url: str, timeout: float) -> dict | str:
    return _request(url, None, timeout, "GET")


class RolloutClient(ABC):
    """What the RL loop needs from an inference engine."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    @abstractmethod
    def generate(self, input_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, n: int = 1, stop_token_ids: list[int] | None = None,
                 seed: int | None = None, ignore_eos: bool = False) -> list[Generation]:
        """n samples continuing `input_ids`, with the log-prob of every generated token.
        `ignore_eos`: generate max_new_tokens tokens whatever is sampled (stop ids still stop)."""

    def generate_batch(self, prompts: list[list[int]], seeds: list[int | None], max_new_tokens: int,
                       **sampling) -> list[list[Generation]]:
        """`generate` for each of `prompts`, prompt i with seed `seeds[i]` and the same other
        sampling parameters: its n Generations, in the prompts' order. This default calls
        `generate` once a prompt, all at once; servers that take a batch in one request do that."""
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: one per prompt, got {len(seeds)} for {len(prompts)} prompts")
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(prompts), 64))) as pool:
            return list(pool.map(lambda ids, seed: self.generate(ids, max_new_tokens, seed=seed, **sampling),
                                 prompts, seeds))

    @abstractmethod
    def update_weights_from_disk(self, path: str, version: str | None = None) -> None:
        """Load the weights of a Hugging Face checkpoint directory in place."""

    def health(self) -> bool:
        try:
            _get(self.url + "/health", 5)
            return True
        except (OSError, RolloutError):
            return False

    def server_info(self) -> dict:
        """What the server says about itself (for the record; keys depend on the server)."""
        return {}


class RoundRobinClient(RolloutClient):
    """Several engines with no router in front (sglang-router speaks SGLang's protocol, vLLM's
    servers another): each generate call goes to the next engine in turn, weights to all."""

    def __init__(self, clients: list[RolloutClient]):
        super().__init__(clients[0].url, clients[0].timeout)
        self.clients = list(clients)
        self._turn = itertools.count()  # next() is atomic: callers' threads each get their own turn

    def generate(self, input_ids, max_new_tokens, **sampling) -> list[Generation]:
        return self.clients[next(self._turn) % len(self.clients)].generate(input_ids, max_new_tokens, **sampling)

    def update_weights_from_disk(self, path, version=None):
        for c in self.clients:
            c.update_weights_from_disk(path, version)


class SGLangClient(RolloutClient):
    """SGLang's native API (`/generate` with input_ids): our server, SGLang, or sglang-router."""

    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, n=1,
                 stop_token_ids=None, seed=None, ignore_eos=False, return_routed_experts: bool = False
                 ) -> list[Generation]:
        sp = self._sampling(max_new_tokens, temperature, top_p, top_k, n, stop_token_ids, seed, ignore_eos)
        payload = {"input_ids": list(input_ids), "sampling_params": sp, "return_logprob": True}
        if return_routed_experts:
            payload["return_routed_experts"] = True
        body = _post(self.url + "/generate", payload, self.timeout)
        return [self._generation(item) for item in (body if isinstance(body, list) else [body])]

    def generate_batch(self, prompts, seeds, max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, n=1,
                       stop_token_ids=None, ignore_eos=False, return_routed_experts: bool = False
                       ) -> list[list[Generation]]:
        """One `/generate` request for all of `prompts`, with one sampling_params a prompt (SGLang's
        batch form: each its seed). Not through sglang-router, which takes one sampling_params for
        a whole batch (its 0.3 refuses a list): give an engine's URL."""
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: one per prompt, got {len(seeds)} for {len(prompts)} prompts")
        if not prompts:
            return []
        payload = {"input_ids": [list(p) for p in prompts], "return_logprob": True,
                   "sampling_params": [self._sampling(max_new_tokens, temperature, top_p, top_k, n, stop_token_ids,
                                                      seed, ignore_eos) for seed in seeds]}
        if return_routed_experts:
            payload["return_routed_experts"] = True
        body = _post(self.url + "/generate", payload, self.timeout)
        items = body if isinstance(body, list) else [body]
        if len(items) != len(prompts) * n:
            raise RolloutError(f"{self.url}: a batch of {len(prompts)} prompts x {n} samples was answered "
                               f"with {len(items)} generations")
        gens = [self._generation(item) for item in items]
        return [gens[i * n:(i + 1) * n] for i in range(len(prompts))]  # (prompt by prompt, as SGLang answers)

    @staticmethod
    def _sampling(max_new_tokens, temperature, top_p, top_k, n, stop_token_ids, seed, ignore_eos) -> dict:
        sp = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "n": n,
              "ignore_eos": ignore_eos}
        if stop_token_ids:
            sp["stop_token_ids"] = list(stop_token_ids)
        if seed is not None:
            sp["sampling_seed"] = seed
        return sp

    @staticmethod
    def _generation(item: dict) -> Generation:
        meta = item["meta_info"]
        lps = meta.get("output_token_logprobs") or []
        return Generation(output_ids=item["output_ids"], logprobs=[float(e[0]) for e in lps],
                          finish_reason=meta["finish_reason"]["type"], weight_version=meta.get("weight_version"),
                          routed_experts=meta.get("routed_experts"), meta=meta)

    def update_weights_from_disk(self, path, version=None):
        body = _post(self.url + "/update_weights_from_disk", {"model_path": str(path), "weight_version": version},
                     self.timeout)
        if not body.get("success"):
            raise RolloutError(f"{self.url}: update_weights_from_disk failed: {body.get('message')}")

    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                    version: str | None = None) -> None:
        buf = io.BytesIO()
        torch.save([(n, t.detach().cpu()) for n, t in named_tensors], buf)
        body = _post(self.url + "/update_weights_from_tensor",
                     {"serialized_named_tensors": [base64.b64encode(buf.getvalue()).decode()],
                      "weight_version": version}, self.timeout)
        if not body.get("success"):
            raise RolloutError(f"{self.url}: update_weights_from_tensor failed: {body.get('message')}")

    def pause(self) -> None:
        _post(self.url + "/pause_generation", {}, self.timeout)

    def resume(self) -> None:
        _post(self.url + "/continue_generation", None, self.timeout)

    def server_info(self) -> dict:
        return _get(self.url + "/get_server_info", self.timeout)


class DistributedWeightSender:
    """The trainer's side of `/init_weights_update_group` + `/update_weights_from_distributed`:
    rank 0 of a process group whose other ranks are the engines, one rank each. `backend`: gloo
    (CPU tensors; CUDA ones are copied to the CPU first) or nccl (CUDA tensors, each engine on a GPU
    of its own, not the sender's)."""

    def __init__(self, clients: list[SGLangClient], master_address: str, master_port: int,
                 backend: str = "gloo", group_name: str = "weight_update_group"):
        import torch.distributed as dist

        self.clients, self.group_name, self.backend = clients, group_name, backend
        self.failed: Exception | None = None
        world = 1 + len(clients)
        errors: list[Exception] = []

        def join(i: int, client: SGLangClient) -> None:
            try:
                body = _post(client.url + "/init_weights_update_group",
                             {"master_address": master_address, "master_port": master_port, "rank_offset": 1 + i,
                              "world_size": world, "group_name": group_name, "backend": backend}, client.timeout)
                if not body.get("success"):
                    errors.append(RolloutError(f"{client.url}: {body.get('message')}"))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=join, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        store = dist.TCPStore(master_address, master_port, world, is_master=True, timeout=timedelta(seconds=120))
        cls = dist.ProcessGroupGloo if backend == "gloo" else dist.ProcessGroupNCCL
        self.group = cls(store, 0, world)
        self._store = store
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str | None = None,
             flattened: bool = True) -> None:
        """Broadcast the tensors to every engine; each applies them in place under `version`, all in
        one update. `flattened` (SGLang's load_format "flattened_bucket"): the tensors of each dtype
        go as one flat buffer — one broadcast per dtype instead of one per tensor (for the tiny model
        1 instead of 93: a full sync to one engine server 21 - 26 ms against 32 - 40 here)."""
        if self.failed is not None:
            raise RolloutError(f"the weight-update group failed in an earlier update ({self.failed}); an engine "
                               "may still hold bytes of it: create a new DistributedWeightSender")
        tensors = [(n, t.detach().contiguous()) for n, t in named_tensors]
        meta = {"names": [n for n, _ in tensors], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in tensors],
                "shapes": [list(t.shape) for _, t in tensors], "group_name": self.group_name,
                "weight_version": version}
        if flattened:
            meta["load_format"] = "flattened_bucket"
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for _, t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t.flatten())
            buffers = [torch.cat(parts) for parts in by_dtype.values()]
        else:
            buffers = [t for _, t in tensors]
        if self.backend == "gloo":  # gloo moves CPU tensors (a CUDA trainer's are copied out first)
            buffers = [b.cpu() for b in buffers]
        elif not all(b.is_cuda for b in buffers):
            raise ValueError("backend nccl sends CUDA tensors: move the weights to the GPU, or use gloo")
        errors: list[Exception] = []

        def request(client: SGLangClient) -> None:
            try:
                body = _post(client.url + "/update_weights_from_distributed", meta, client.timeout)
                if not body.get("success"):
                    errors.append(RolloutError(f"{client.url}: {body.get('message')}"))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=request, args=(c,)) for c in self.clients]
        for t in threads:
            t.start()
        try:
            for t in buffers:
                work = self.group.broadcast(t, 0)
                while not work.is_completed():
                    if errors:  # an engine refused the update before joining the broadcast (an unknown
                        raise errors[0]  # group, a server without load_format): it never will
                    time.sleep(0.00005)
                work.wait()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        except Exception as e:
            self.failed = e  # the group's streams may be out of step now: no later update may use it
            raise


class VLLMClient(RolloutClient):
    """vLLM's OpenAI server: `/v1/completions` with token ids in (`prompt` as a list of ids) and
    `return_tokens_as_token_ids`, log-probs after temperature when the server runs with
    `--logprobs-mode processed_logprobs` (as `rlfoundry serve --backend vllm` starts it).
    Weights from disk through vLLM's dev `/collective_rpc` `reload_weights` (VLLM_SERVER_DEV_MODE=1)
    and the version through `/update_weight_version`."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0):
        """`model`: the name the server serves (None: the first that its /v1/models lists)."""
        super().__init__(url, timeout)
        self.model = model or _get(self.url + "/v1/models", timeout)["data"][0]["id"]
        self.weight_version: str | None = None

    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, n=1,
                 stop_token_ids=None, seed=None, ignore_eos=False) -> list[Generation]:
        payload = {"model": self.model, "prompt": list(input_ids), "max_tokens": max_new_tokens,
                   "temperature": temperature, "top_p": top_p, "top_k": top_k, "n": n, "logprobs": 0,
                   "return_tokens_as_token_ids": True, "ignore_eos": ignore_eos}
        if stop_token_ids:
            payload["stop_token_ids"] = list(stop_token_ids)
        if seed is not None:
            payload["seed"] = seed
        body = _post(self.url + "/v1/completions", payload, self.timeout)
        out = []
        for choice in sorted(body["choices"], key=lambda c: c["index"]):
            lp = choice["logprobs"]
            ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
            out.append(Generation(output_ids=ids, logprobs=[float(x) for x in lp["token_logprobs"]],
                                  finish_reason="stop" if choice["finish_reason"] == "stop" else
                                  ("length" if choice["finish_reason"] == "length" else "abort"),
                                  weight_version=self.weight_version, meta=choice))
        return out

    def server_info(self) -> dict:
        model = next((m for m in _get(self.url + "/v1/models", self.timeout)["data"] if m["id"] == self.model), {})
        return {"served_model_name": self.model, "context_length": model.get("max_model_len"),
                "weight_version": self.weight_version}

    def update_weights_from_disk(self, path, version=None):
        _post(self.url + "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}},
              self.timeout)
        _post(self.url + "/reset_prefix_cache", None, self.timeout)  # cached prefixes hold the old weights' KV
        if version is not None:
            _post(self.url + "/update_weight_version", {"new_version": str(version)}, self.timeout)
            self.weight_version = str(version)
