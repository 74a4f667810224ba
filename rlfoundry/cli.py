"""The `rlfoundry` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _model_info(args: argparse.Namespace) -> int:
    from rlfoundry.model import PRESETS, ConfigError, ModelConfig

    try:
        if args.model in PRESETS:
            cfg = ModelConfig.from_preset(args.model)
        else:
            path = Path(args.model)
            if not path.exists():
                raise ConfigError(f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) "
                                  "nor a checkpoint directory or config.json")
            cfg = ModelConfig.from_json_file(path / "config.json" if path.is_dir() else path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = cfg.param_counts()
    with_mtp = cfg.param_counts(include_mtp=True)
    info = {"model": args.model, "total_params": counts["total"], "active_params": counts["active"],
            "total_params_with_mtp": with_mtp["total"], "layers": cfg.num_hidden_layers,
            "dense_layers": cfg.first_k_dense_replace, "routed_experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok, "mtp_layers": cfg.num_nextn_predict_layers}
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.console import Console
    from rich.table import Table

    def human(n: int) -> str:
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    table = Table(title=f"{args.model}  (counted as the GLM-4.5 report: no MTP; active without embeddings/head)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("total parameters", human(counts["total"]))
    table.add_row("active parameters per token", human(counts["active"]))
    table.add_row("total with the MTP layer", human(with_mtp["total"]))
    table.add_row("layers (dense + MoE)", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} + {cfg.num_moe_layers})")
    table.add_row("routed experts / shared / per token",
                  f"{cfg.n_routed_experts} / {cfg.n_shared_experts} / {cfg.num_experts_per_tok}")
    table.add_row("heads / KV heads / head_dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim}")
    Console().print(table)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rlfoundry.demo import run_demo

    return run_demo(Path(args.out), seed=args.seed, overrides=list(args.overrides))


def _serve(args: argparse.Namespace) -> int:
    import shlex

    from rlfoundry.rollout.launch import BACKENDS, EngineSpec, serve

    if args.vllm_args and args.backend != "vllm":
        print(f"error: --vllm-args {args.vllm_args!r}: for --backend vllm only (this is --backend {args.backend}; "
              "its options are this command's own)", file=sys.stderr)
        return 2
    backend = BACKENDS[args.backend](shlex.split(args.vllm_args))
    spec = EngineSpec(args.model, max_batch=args.max_batch, max_len=args.max_len, dtype=args.dtype,
                      served_model_name=args.served_model_name, speculative_steps=args.speculative_steps,
                      compile_decode=args.compile_decode, admit_quiet_ms=args.admit_quiet_ms,
                      batch_invariant=args.batch_invariant, device=args.device)
    return serve(spec, host=args.host, port=args.port, engines=args.engines, log_level=args.log_level, backend=backend)


def _stage(args: argparse.Namespace) -> int:
    from rlfoundry.data.datasets import DataError
    from rlfoundry.train.stages import ConfigError, load_stage_config, run_stage

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    try:
        cfg = load_stage_config(args.config, overrides, args.command)
        hf = run_stage(cfg, args.out or f"runs/{args.command}", resume=args.resume)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {hf}")
    return 0


def _rl(args: argparse.Namespace) -> int:
    from rlfoundry.data.datasets import DataError
    from rlfoundry.rl.config import load_rl_config
    from rlfoundry.rl.loop import run_rl
    from rlfoundry.train.stages import ConfigError

    try:
        cfg = load_rl_config(args.config, list(args.overrides))
        result = run_rl(cfg, args.out, resume=args.resume)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"before": result["before"], "after": result["after"], "buffer": result["buffer"]}))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from rlfoundry.buffer import Buffer

    db = Path(args.run_dir) / "buffer.sqlite"
    if not db.exists():
        print(f"error: {args.run_dir}: no buffer.sqlite (not an RL run directory)", file=sys.stderr)
        return 2
    counts = Buffer(db).counts()
    metrics = Path(args.run_dir) / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        counts["steps_logged"] = max((m["step"] for m in lines), default=0)
    print(json.dumps(counts))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rlfoundry.data.tasks import get_task
    from rlfoundry.evaluate import evaluate

    if not (Path(args.model) / "config.json").exists():
        print(f"error: --model {args.model}: no config.json there", file=sys.stderr)
        return 2
    levels = get_task(args.task).levels
    if args.level is not None and not 1 <= args.level <= levels:
        print(f"error: --level must be in 1..{levels} for {args.task}, got {args.level}", file=sys.stderr)
        return 2
    if args.n <= 0 or args.max_new_tokens <= 0:
        print(f"error: --n and --max-new-tokens must be positive, got {args.n} and {args.max_new_tokens}",
              file=sys.stderr)
        return 2
    result = evaluate(args.model, args.task, [args.level] if args.level else None, n=args.n, seed=args.seed,
                      max_new_tokens=args.max_new_tokens)
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rlfoundry.data.tasks import TASKS
    from rlfoundry.rollout.launch import ADMIT_QUIET_MS

    parser = argparse.ArgumentParser(prog="rlfoundry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model-info", help="parameter counts of a preset or a checkpoint directory")
    p.add_argument("model", help="a preset (glm-4.5, glm-4.5-air, tiny) or a checkpoint directory / config.json")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_model_info)
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (SGLang native API + OpenAI API)")
    p.add_argument("--model", required=True, help="Hugging Face glm4_moe checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--engines", type=int, default=1, help="N > 1: N engine servers behind sglang-router on --port")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="weights and arithmetic (float64: RL's exact mode, fp32 weights held exactly)")
    p.add_argument("--served-model-name", default=None, help="model name of the OpenAI API (default: --model)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--backend", default="rlfoundry", choices=["rlfoundry", "vllm"],
                   help="the engine: ours, or vLLM's OpenAI server on the same checkpoint")
    p.add_argument("--vllm-args", default="", help="extra arguments for vLLM's server (e.g. '--enforce-eager')")
    p.add_argument("--speculative-steps", type=int, default=0,
                   help="MTP speculative decoding: draft tokens per step (3 is GLM-4.5's setting; 0 is off)")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode steps through torch.compile (faster; compiles at start-up for a minute or two)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="compute each sequence as if alone, so that a trainer doing the same (RL's batch_invariant) "
                        "gets its log-probs bit for bit in fp32; eager decoding only")
    p.add_argument("--device", default="cpu",
                   help="where our engine computes: cpu, cuda (with --engines N: engine i on GPU i mod the GPUs "
                        "visible) or cuda:N")
    p.add_argument("--admit-quiet-ms", type=_non_negative_float, default=ADMIT_QUIET_MS,
                   help="an idle engine starts arriving requests once none has come for this long (at most "
                        "50 ms after the first), so a burst (an RL step's groups) runs as one batch; 0: at once")
    p.set_defaults(func=_serve)
    for stage, what in (("pretrain", "pre-training on packed token streams"),
                        ("midtrain", "mid-training: best-fit packing, optional RoPE base change"),
                        ("sft", "supervised fine-tuning on conversations, loss on assistant tokens")):
        p = sub.add_parser(stage, help=what)
        p.add_argument("--config", default=None, help="YAML file of the stage configuration")
        p.add_argument("--out", default=None, help=f"run directory (default runs/{stage})")
        p.add_argument("--max-steps", type=int, default=None)
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 data.tasks=[arithmetic]")
        p.set_defaults(func=_stage)
    p = sub.add_parser("eval", help="accuracy of a checkpoint on a built-in task (one JSON line)")
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="a built-in task")
    p.add_argument("--level", type=int, default=None, help="one level (default: all)")
    p.add_argument("--n", type=int, default=100, help="problems per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=_eval)
    p = sub.add_parser("rl", help="RL post-training (synchronous colocated mode on Ray)")
    p.add_argument("--config", default=None, help="YAML file of the RL configuration (see examples/tiny/rl.yaml)")
    p.add_argument("--out", default="runs/rl", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 rollout.n_samples_per_prompt=4")
    p.set_defaults(func=_rl)
    p = sub.add_parser("inspect", help="counts of an RL run's buffer (one JSON line)")
    p.add_argument("run_dir")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("demo", help="the embedded default job: RL on the shipped tiny model (CPU, no downloads)")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value changes to examples/tiny/rl.yaml")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come between options
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
