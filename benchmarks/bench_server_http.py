"""The engine server's HTTP parser, side by side: two `rlfoundry serve` engine servers on the shipped
tiny model, one parsing HTTP with h11 (pure Python, uvicorn's fallback) and one with httptools (C,
the server's `HTTP_PARSER`), answering in turn an RL step's requests as the RL loop sends them: one
`/generate` request per group of 8 samples, 32 groups at once (Countdown level-2 prompts, temperature
1, at most 64 new tokens). Prints the median seconds a round of each and the ratio.

    .venv/bin/python benchmarks/bench_server_http.py [--rounds 16] [--groups 32] [--compile-decode]

The HTTP thread shares the interpreter (and the two cores here) with the decode loop, so the
parser's cost shows in how soon the whole round is answered, not only in each request's latency.
Start-up (and with --compile-decode the compiling, ~1 minute a server) is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rlfoundry.buffer import PromptDataset  # noqa: E402
from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer  # noqa: E402
from rlfoundry.rl.config import DEFAULT_MODEL  # noqa: E402
from rlfoundry.rollout.client import SGLangClient  # noqa: E402
from rlfoundry.rollout.launch import free_port, wait_healthy  # noqa: E402

SERVE = """
import sys
from rlfoundry.rollout import launch
launch.HTTP_PARSER = sys.argv[1]  # (what `serve` hands uvicorn)
sys.exit(launch.serve(launch.EngineSpec(sys.argv[2], max_batch=int(sys.argv[3]), compile_decode=sys.argv[4] == "1"),
                      "127.0.0.1", int(sys.argv[5]), log_level="error"))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--groups", type=int, default=32, help="group requests a round, all at once")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--compile-decode", action="store_true", help="the servers decode through torch.compile")
    args = ap.parse_args()
    tok = load_tokenizer(DEFAULT_MODEL)
    ds = PromptDataset.load("task:countdown:2", n_per_level=args.groups * args.rounds, seed=1)
    prompts = [ds.token_ids(i, tok) for i in range(len(ds))]
    eos = eos_token_ids(tok)
    procs, clients = [], {}
    try:
        for parser in ("h11", "httptools"):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-c", SERVE, parser, str(DEFAULT_MODEL), str(args.groups * args.group_size),
                 "1" if args.compile_decode else "0", str(port)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}))
            clients[parser] = SGLangClient(f"http://127.0.0.1:{port}")
        for c in clients.values():
            wait_healthy(c.url + "/health", 900, procs)
        times: dict[str, list[float]] = {p: [] for p in clients}
        with ThreadPoolExecutor(args.groups) as pool:
            for r in range(args.rounds + 1):  # the first round of each warms up, untimed
                batch = prompts[(r % args.rounds) * args.groups:(r % args.rounds + 1) * args.groups]
                for parser, c in clients.items():
                    t0 = time.perf_counter()
                    outs = list(pool.map(lambda i: c.generate(batch[i], args.max_new_tokens, n=args.group_size,
                                                              seed=1000 * r + i, stop_token_ids=eos), range(len(batch))))
                    dt = time.perf_counter() - t0
                    assert all(len(o) == args.group_size for o in outs)
                    if r:
                        times[parser].append(dt)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
    med = {p: statistics.median(t) for p, t in times.items()}
    print(f"{args.rounds} rounds of {args.groups} requests x {args.group_size} samples, "
          f"at most {args.max_new_tokens} new tokens, {'compiled' if args.compile_decode else 'eager'} decoding")
    for p, m in med.items():
        print(f"  {p:10s}: {m:.3f} s a round (min {min(times[p]):.3f})")
    print(f"h11 / httptools: {med['h11'] / med['httptools']:.2f}x")


if __name__ == "__main__":
    main()
