"""The HTTP server: SGLang's native API, the OpenAI API, weight updates, bad requests."""

import base64
import io
import json

import pytest
import torch
from fastapi.testclient import TestClient

from rlfoundry.model import load_pretrained
from rlfoundry.rollout.launch import EngineSpec, build_engine_app


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    app, _ = build_engine_app(EngineSpec(str(tiny_checkpoint), max_batch=8, max_len=128, served_model_name="tiny"))
    with TestClient(app) as c:
        yield c
    app.state.engine.shutdown()


def test_generate_native_api_with_logprobs(client, tiny_checkpoint):
    r = client.post("/generate", json={"input_ids": [5, 6, 7, 8], "return_logprob": True,
                                       "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["output_ids"]) == 6 and body["meta_info"]["completion_tokens"] == 6
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    lps = body["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == body["output_ids"]
    model = load_pretrained(tiny_checkpoint)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8] + body["output_ids"]])).logits[0, 3:-1]
    assert logits.argmax(-1).tolist() == body["output_ids"]
    ref = logits.log_softmax(-1).gather(1, torch.tensor(body["output_ids"])[:, None]).flatten()
    assert (ref - torch.tensor([lp for lp, _, _ in lps])).abs().max() <= 1e-5
    assert body["meta_info"]["weight_version"] == "0"


def test_generate_text_batch_and_n(client):
    r = client.post("/generate", json={"text": ["1 + 2 =", "the quick"], "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200 and len(r.json()) == 2 and all(isinstance(x["text"], str) for x in r.json())
    r = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 5, "n": 4,
                                                                                   "sampling_seed": 7}})
    outs = r.json()
    assert len(outs) == 4 and len({tuple(o["output_ids"]) for o in outs}) > 1


def test_batch_with_sampling_params_per_prompt_equals_one_request_each(client):
    """SGLang's batch form: a list of sampling_params, one per prompt; outputs prompt by prompt,
    each prompt's n samples together, each the same as its request alone."""
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    params = [{"max_new_tokens": 5, "n": 2, "sampling_seed": 3}, {"max_new_tokens": 3, "temperature": 0},
              {"max_new_tokens": 4, "n": 3, "sampling_seed": 11, "temperature": 0.7}]
    r = client.post("/generate", json={"input_ids": prompts, "sampling_params": params, "return_logprob": True})
    assert r.status_code == 200, r.text
    batch = r.json()
    alone = []
    for p, sp in zip(prompts, params):
        one = client.post("/generate", json={"input_ids": p, "sampling_params": sp, "return_logprob": True}).json()
        alone += one if isinstance(one, list) else [one]
    assert [o["output_ids"] for o in batch] == [o["output_ids"] for o in alone]
    assert [len(o["output_ids"]) for o in batch] == [5, 5, 3, 4, 4, 4]
    for b, a in zip(batch, alone):
        lb, la = (torch.tensor([e[0] for e in o["meta_info"]["output_token_logprobs"]]) for o in (b, a))
        assert (lb - la).abs().max() <= 1e-5
    r = client.post("/generate", json={"input_ids": prompts, "sampling_params": params[:2]})
    assert r.status_code == 400 and "sampling_params" in r.json()["error"]["message"], r.text
    r = client.post("/generate", json={"input_ids": [1, 2], "sampling_params": params[:1]})
    assert r.status_code == 400 and "sampling_params" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("payload,fragment", [
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"input_ids": "abc"}, "input_ids"),
    ({"input_ids": [1, 2], "bogus": 1}, "bogus"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"input_ids": list(range(200))}, "does not fit the context"),
    ({"input_ids": [1, 99999]}, "input_ids"),
    ({"text": "a", "input_ids": [1]}, "exactly one"),
    ({"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, payload, fragment):
    r = client.post("/generate", json=payload)
    assert 400 <= r.status_code < 500 and fragment in r.json()["error"]["message"], r.text
    assert client.get("/health_generate").status_code == 200


def test_info_health_metrics_flush(client):
    assert client.get("/health").status_code == 200
    info = client.get("/get_model_info").json()
    assert info["is_generation"] and info["weight_version"] == "0"
    server = client.get("/get_server_info").json()
    assert server["max_running_requests"] == 8 and server["context_length"] == 128 and server["device"] == "cpu"
    # NCCL moves CUDA tensors: a CPU engine refuses to join an NCCL weight-update group (nothing hangs)
    r = client.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": 1,
                                                         "world_size": 2, "backend": "nccl"})
    assert r.status_code == 400 and "nccl" in r.json()["message"] and "use gloo" in r.json()["message"], r.text
    metrics = client.get("/metrics").text
    assert "rlfoundry_running_requests 0" in metrics and "rlfoundry_generated_tokens_total" in metrics
    assert client.post("/flush_cache").status_code == 200
    assert "openapi" in client.get("/openapi.json").json()


def test_weight_updates_from_disk_and_tensor(client, tiny_checkpoint, tmp_path):
    from rlfoundry.model import Glm4MoeForCausalLM, save_pretrained

    ask = {"input_ids": [9, 10, 11], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    before = client.post("/generate", json=ask).json()
    cfg = load_pretrained(tiny_checkpoint).config
    other = Glm4MoeForCausalLM(cfg)
    other.init_weights(seed=77)
    save_pretrained(other, tmp_path / "other")
    r = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "other"), "weight_version": "2"})
    assert r.status_code == 200 and r.json()["success"], r.text
    after = client.post("/generate", json=ask).json()
    assert after["meta_info"]["weight_version"] == "2" and after["output_ids"] != before["output_ids"]
    # back to the original weights through /update_weights_from_tensor
    buf = io.BytesIO()
    torch.save(list(load_pretrained(tiny_checkpoint).state_dict().items()), buf)
    r = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": [base64.b64encode(buf.getvalue()).decode()],
                                                         "weight_version": "3"})
    assert r.status_code == 200 and r.json()["success"], r.text
    again = client.post("/generate", json=ask).json()
    assert again["output_ids"] == before["output_ids"] and again["meta_info"]["weight_version"] == "3"
    r = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "nowhere")})
    assert r.status_code == 400 and not r.json()["success"]


def test_openai_api(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "1 + 2 =", "max_tokens": 5, "temperature": 0,
                                             "logprobs": 1})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert len(c["logprobs"]["token_logprobs"]) == r.json()["usage"]["completion_tokens"] == 5
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 5, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    # streaming: server-sent events whose deltas add up to the non-streamed answer
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "1 + 1 ="}], "max_tokens": 6, "temperature": 0}
    full = client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as s:
        events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
