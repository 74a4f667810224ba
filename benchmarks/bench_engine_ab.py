"""Our engine against itself at another commit, interleaved in one process: how a change to
`rlfoundry/rollout/engine.py` measures on this shared VM, whose speed moves 2x within an hour
(runs one after the other cannot tell a 5% change from noise).

The engine module of `--ref` (read with `git show`) is loaded beside the current one as a module of
its own, so its compiled functions are other objects with graphs of their own; both drive the
current tree's model code (only the engine is compared). Compiled engines (`compile_decode`).

- `--batch 1` (default): the shipped model's 32 task prompts one at a time (as
  `bench_rollout.py`'s speculative decoding lines), greedy, four engines — plain and speculative
  (3 draft tokens), at `--ref` and now — taking turns prompt by prompt; the same greedy tokens
  checked. Prints ms a prompt per round and the speculative / plain ratio of each.
- `--batch B` > 1: B synthetic 16-token prompts, 128 new tokens, plain decoding at both commits
  taking turns, tokens/s per round.

    .venv/bin/python benchmarks/bench_engine_ab.py --ref HEAD~1 [--rounds 10] [--batch 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_rollout  # noqa: E402

from rlfoundry.model import load_pretrained  # noqa: E402
from rlfoundry.rollout import engine as current  # noqa: E402


def engine_module_at(ref: str, tmp: Path):
    """`rlfoundry/rollout/engine.py` as it is at commit `ref`, imported under a name of its own."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:rlfoundry/rollout/engine.py"],
                         capture_output=True, text=True)
    if src.returncode != 0:
        raise SystemExit(f"--ref {ref!r}: {src.stderr.strip()}")
    path = tmp / "engine_at_ref.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("engine_at_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_at_ref"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def batch_one(model, modules: dict, prompts: list[list[int]], rounds: int) -> None:
    max_len = max(map(len, prompts)) + 136
    engines = {f"{kind} {name}": m.Engine(model, max_batch=1, max_len=max_len, compile_decode=True,
                                          speculative_steps=3 if kind == "spec" else 0)
               for name, m in modules.items() for kind in ("plain", "spec")}
    params = {name: m.SamplingParams(temperature=0, max_new_tokens=128) for name, m in modules.items()}
    for key, e in engines.items():
        e.warmup()
        e.generate(prompts[:2], params[key.split()[1]])
    totals = {key: 0.0 for key in engines}
    first: dict[str, list] = {}
    for r in range(rounds):
        secs = {key: 0.0 for key in engines}
        for q in prompts:
            for key, e in engines.items():
                t = time.perf_counter()
                out = e.generate([q], params[key.split()[1]])[0][0]
                secs[key] += time.perf_counter() - t
                if r == 0:
                    first.setdefault(key, []).append(out.output_ids)
        for key in engines:
            totals[key] += secs[key]
        ms = " ".join(f"{key} {1e3 * v / len(prompts):6.2f}" for key, v in secs.items())
        ratios = " ".join(f"{name} {secs[f'plain {name}'] / secs[f'spec {name}']:.3f}x" for name in modules)
        print(f"round {r}: ms a prompt: {ms}; speculative / plain: {ratios}", flush=True)
    assert all(ids == first["plain ref"] for ids in first.values()), "the engines' greedy tokens differ"
    n = rounds * len(prompts)
    print("all rounds, ms a prompt: " + " ".join(f"{key} {1e3 * v / n:.2f}" for key, v in totals.items()))
    for kind in ("plain", "spec"):
        print(f"{kind}: now / ref time {totals[f'{kind} now'] / totals[f'{kind} ref']:.3f}")
    print("speculative / plain: " + " ".join(
        f"{name} {totals[f'plain {name}'] / totals[f'spec {name}']:.3f}x" for name in modules))


def batch_many(model, modules: dict, B: int, rounds: int) -> None:
    plen, new = 16, 128
    engines = {name: m.Engine(model, max_batch=B, max_len=plen + new + 8, compile_decode=True)
               for name, m in modules.items()}
    prompts = bench_rollout.prompts_for(B, plen)
    for name, e in engines.items():
        e.warmup()
        e.generate(prompts, modules[name].SamplingParams(temperature=0, max_new_tokens=4))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, e in engines.items():
            params = modules[name].SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
            t = time.perf_counter()
            e.generate(prompts, params)
            rates[name].append(B * new / (time.perf_counter() - t))
        print(f"round {r}: tokens/s " + " ".join(f"{name} {v[-1]:.0f}" for name, v in rates.items()), flush=True)
    per_round = [a / b for a, b in zip(rates["now"], rates["ref"])]
    print(f"now / ref tokens/s: median {statistics.median(per_round):.3f} "
          f"(rounds {min(per_round):.2f} - {max(per_round):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="the commit to compare with (e.g. HEAD~1)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", default=str(ROOT / "examples" / "tiny" / "model"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"ref": engine_module_at(args.ref, Path(tmp)), "now": current}
        model = load_pretrained(args.model)
        print(f"engine at {args.ref} ('ref') against the working tree's ('now'), compiled, "
              f"batch {args.batch}, {args.rounds} rounds", flush=True)
        if args.batch == 1:
            prompts = bench_rollout.task_prompts_for(Path(args.model))
            if not prompts:
                raise SystemExit(f"{args.model}: no tokenizer with a chat template for the task prompts")
            batch_one(model, modules, prompts, args.rounds)
        else:
            batch_many(model, modules, args.batch, args.rounds)


if __name__ == "__main__":
    main()
