"""The training stages — pre-training, mid-training, SFT — as one loop over one trainer.

`rlfoundry pretrain|midtrain|sft --config FILE [--out DIR] [--max-steps N] [--resume] [key=value ...]`

- pretrain: documents (built-in task text or a text dataset) packed end to end into `seq_len` rows;
- midtrain: the same with best-fit packing (documents never split) and, optionally, a new RoPE base
  (`rope_theta`), as GLM-4.5 raises it from 10,000 to 1,000,000 when extending the context;
- sft: conversations in the checkpoint's chat template, loss on assistant tokens only.

A run directory holds config.yaml, metrics.jsonl (one object per optimizer step), TensorBoard
events, checkpoints/ (sharded, exact resume), loss.png, and hf/ — the final model and tokenizer as a
Hugging Face checkpoint. Batches are a pure function of (seed, step), so a resumed run sees exactly
the data the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import numpy as np
import torch
import yaml

from rlfoundry.data.datasets import DataStats, read_records
from rlfoundry.data.packing import best_fit_pack, pack_stream, packed_loss_mask
from rlfoundry.data.tasks import get_task
from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer, train_tokenizer
from rlfoundry.model import PRESETS, Glm4MoeForCausalLM, ModelConfig, load_pretrained, save_pretrained
from rlfoundry.train.checkpoint import load_checkpoint, save_checkpoint
from rlfoundry.train.schedule import batch_size_warmup
from rlfoundry.train.trainer import Batch, TrainConfig, Trainer


class ConfigError(ValueError):
    """A stage configuration is wrong; the message names the field and the value."""


@dataclass
class DataConfig:
    source: str = "tasks"
    """"tasks" (generated from the built-in tasks) or a path: JSONL, Parquet or a datasets directory."""
    tasks: list = field(default_factory=lambda: ["arithmetic", "countdown"])
    """Built-in tasks to draw from (source: tasks)."""
    levels: list = field(default_factory=list)
    """Difficulty levels to draw from (empty: all levels of each task)."""
    examples_per_level: int = 2000
    """Problems generated per task and level (source: tasks)."""
    text_key: str = "text"
    """Field holding the text of a pre-training record."""
    messages_key: str = "messages"
    """Field holding the conversation of an SFT record."""
    skip_bad_rows: bool = False
    """Skip (and count) rows that fail validation instead of stopping with an error."""


@dataclass
class StageConfig:
    stage: str = "pretrain"
    """"pretrain", "midtrain" or "sft"."""
    model: str = "tiny"
    """A preset (tiny, glm-4.5-air, glm-4.5) to start from random weights, or a checkpoint directory."""
    model_overrides: dict = field(default_factory=dict)
    """ModelConfig fields to change on a preset (e.g. {num_hidden_layers: 2})."""
    tokenizer: str = ""
    """Tokenizer directory; empty: the checkpoint's, or (for a preset) one trained on the data."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    micro_batch_size: int = 16
    """Sequences per forward/backward (gradient accumulation over batch_size / micro_batch_size)."""
    batch_size_start: int = 0
    """Batch-size warm-up (GLM-4.5 ramps 16M -> 64M tokens per batch): sequences per step at step 0,
    growing linearly to batch_size over batch_warmup_steps, in multiples of micro_batch_size
    (0: no warm-up)."""
    batch_warmup_steps: int = 0
    """Steps of the batch-size warm-up."""
    max_steps: int = 500
    """Optimizer steps of the run."""
    log_every: int = 10
    """Steps between TensorBoard scalars and progress updates (metrics.jsonl gets every step)."""
    save_every: int = 100
    """Steps between checkpoints (one is always written at the end)."""
    rope_theta: float = 0.0
    """Mid-training: the new RoPE base (0 keeps the model's)."""
    seed: int = 0
    """Seed of initialisation, data order and dropout-free training."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the training text or conversations come from."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule and loss weights."""

    def validate(self) -> "StageConfig":
        if self.stage not in ("pretrain", "midtrain", "sft"):
            raise ConfigError(f"field 'stage' must be pretrain, midtrain or sft, got {self.stage!r}")
        for name in ("seq_len", "batch_size", "micro_batch_size", "max_steps", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"field '{name}' must be positive, got {getattr(self, name)!r}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"field 'batch_size' ({self.batch_size}) must be a multiple of "
                              f"micro_batch_size ({self.micro_batch_size})")
        if not 0 <= self.batch_size_start <= self.batch_size or self.batch_warmup_steps < 0:
            raise ConfigError(f"field 'batch_size_start' must be in [0, batch_size={self.batch_size}] and "
                              f"'batch_warmup_steps' >= 0, got {self.batch_size_start} and {self.batch_warmup_steps}")
        if self.model not in PRESETS and not (Path(self.model) / "config.json").exists():
            raise ConfigError(f"field 'model' must be a preset {sorted(PRESETS)} or a checkpoint directory, "
                              f"got {self.model!r}")
        for t in self.data.tasks:
            try:
                get_task(t)
            except KeyError as e:
                raise ConfigError(f"field 'data.tasks': {e.args[0]}") from None
        return self


# ------------------------------------------------------------------------------ config loading
def build_config(cls, values: dict, where: str = ""):
    """A dataclass from a mapping, checking names and types; errors name the dotted field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(repr(f'{where}{u}') for u in sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        t = hints[name]
        key = f"{where}{name}"
        if dataclasses.is_dataclass(t):
            kwargs[name] = build_config(t, value, f"{key}.")
            continue
        base = get_origin(t) or t
        if base is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
              list: lambda v: isinstance(v, list), dict: lambda v: isinstance(v, dict)}.get(base, lambda v: True)
        if not ok(value):
            raise ConfigError(f"field '{key}' must be {getattr(base, '__name__', base)}, got {value!r}")
        kwargs[name] = float(value) if base is float else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def load_stage_config(path: str | None, overrides: list[str], stage: str) -> StageConfig:
    """YAML file (optional) + `key=value` overrides (dotted keys, YAML values) -> validated config."""
    values = read_config_values(path, overrides)
    values["stage"] = stage
    if "train" in values and "mtp_schedule" in values["train"]:
        values["train"]["mtp_schedule"] = [tuple(x) for x in values["train"]["mtp_schedule"]]
    return build_config(StageConfig, values, "").validate()


def read_config_values(path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The mapping of a YAML file (optional) with `key=value` overrides applied (dotted keys,
    YAML values)."""
    values: dict[str, Any] = {}
    if path:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return values


# ------------------------------------------------------------------------------ data
def _task_problems(cfg: StageConfig, seed: int):
    """(task, problem) for every configured task and level of the built-in tasks."""
    for name in cfg.data.tasks:
        task = get_task(name)
        for level in cfg.data.levels or range(1, task.levels + 1):
            if level <= task.levels:
                yield from ((task, p) for p in task.problems(cfg.data.examples_per_level, level, seed=seed))


def _texts(cfg: StageConfig, stats: DataStats) -> list[str]:
    d = cfg.data
    if d.source == "tasks":
        return [task.pretrain_text(p) for task, p in _task_problems(cfg, cfg.seed)]
    return [r[d.text_key] for r in read_records(d.source, "text", d.text_key, skip_bad=d.skip_bad_rows, stats=stats)]


def _conversations(cfg: StageConfig, stats: DataStats) -> list[list[dict]]:
    d = cfg.data
    if d.source == "tasks":
        return [task.sft_messages(p) for task, p in _task_problems(cfg, cfg.seed + 1)]
    return [r[d.messages_key] for r in read_records(d.source, "messages", messages_key=d.messages_key,
                                                     skip_bad=d.skip_bad_rows, stats=stats)]


def sft_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a conversation: each assistant turn is trained (its content and
    the end-of-text token after it); everything before it is rendered by the chat template as a
    generation prompt, exactly as at inference."""
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer = tokenizer.encode(m["content"], add_special_tokens=False) + [eos]
        new_prompt = prompt_ids[len(ids):] if prompt_ids[: len(ids)] == ids else prompt_ids
        if new_prompt is prompt_ids and ids:  # the template re-rendered history differently: restart
            ids, mask = [], []
        ids += new_prompt + answer
        mask += [0] * len(new_prompt) + [1] * len(answer)
    return ids, mask


def build_rows(cfg: StageConfig, tokenizer) -> tuple[dict[str, torch.Tensor], DataStats]:
    stats = DataStats()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if cfg.stage == "sft":
        docs, masks = zip(*(sft_tokens(tokenizer, c) for c in _conversations(cfg, stats)))
        ids, seg, pos, mask = best_fit_pack(list(docs), cfg.seq_len, eos, list(masks))
    else:
        docs = [tokenizer.encode(t, add_special_tokens=False) for t in _texts(cfg, stats)]
        random.Random(cfg.seed).shuffle(docs)
        if cfg.stage == "midtrain":
            ids, seg, pos, mask = best_fit_pack(docs, cfg.seq_len, eos)
        else:
            ids, seg, pos = pack_stream(docs, cfg.seq_len, eos)
            mask = packed_loss_mask(seg)
    if len(ids) < cfg.batch_size:
        raise ConfigError(f"the data make {len(ids)} sequences of {cfg.seq_len} tokens, fewer than batch_size "
                          f"{cfg.batch_size}")
    return {"input_ids": ids, "segment_ids": seg, "position_ids": pos, "loss_mask": mask}, stats


def batch_size_at(step: int, cfg: StageConfig) -> int:
    """Sequences in optimizer step `step` (the batch-size warm-up, then batch_size)."""
    if not cfg.batch_size_start or step >= cfg.batch_warmup_steps:
        return cfg.batch_size
    return batch_size_warmup(step, cfg.batch_size_start, cfg.batch_size, cfg.batch_warmup_steps,
                             multiple=cfg.micro_batch_size)


def batches_for_step(rows: dict[str, torch.Tensor], step: int, cfg: StageConfig) -> list[Batch]:
    """The micro-batches of optimizer step `step`: a pure function of (seed, step). The rows form a
    stream of epochs, each in its own seeded order and cut to a whole number of full batches; step
    `step` takes the next batch_size_at(step) rows of the stream."""
    n = rows["input_ids"].shape[0]
    usable = n // cfg.batch_size * cfg.batch_size
    warm = min(step, cfg.batch_warmup_steps)
    start = sum(batch_size_at(i, cfg) for i in range(warm)) + (step - warm) * cfg.batch_size
    size = batch_size_at(step, cfg)
    orders: dict[int, torch.Tensor] = {}
    idx = []
    for k in range(start, start + size):
        epoch, i = divmod(k, usable)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx.append(orders[epoch][i])
    idx = torch.stack(idx)
    out = []
    for j in range(0, size, cfg.micro_batch_size):
        sel = idx[j:j + cfg.micro_batch_size]
        out.append(Batch(rows["input_ids"][sel], rows["loss_mask"][sel], rows["segment_ids"][sel],
                         rows["position_ids"][sel]))
    return out


# ------------------------------------------------------------------------------ the run
def _model_and_tokenizer(cfg: StageConfig, out: Path):
    if cfg.model in PRESETS:
        torch.manual_seed(cfg.seed)
        model_cfg = ModelConfig.from_preset(cfg.model, **cfg.model_overrides)
        model = Glm4MoeForCausalLM(model_cfg)
        model.init_weights(seed=cfg.seed)
        tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else out / "tokenizer"
        if not cfg.tokenizer and not (tok_dir / "tokenizer.json").exists():
            sample = _texts(cfg, DataStats()) if cfg.stage != "sft" else [
                m["content"] for c in _conversations(cfg, DataStats()) for m in c]
            train_tokenizer(sample, model_cfg.vocab_size, tok_dir)
    else:
        model = load_pretrained(cfg.model, mtp="auto")
        tok_dir = Path(cfg.tokenizer or cfg.model)
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer is None:
        raise ConfigError(f"field 'tokenizer': no tokenizer in {tok_dir}")
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {model.config.vocab_size}")
    if cfg.rope_theta:
        model.config.rope_theta = cfg.rope_theta
    model.config.eos_token_id = eos_token_ids(tokenizer)
    return model, tokenizer


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["loss"] for m in metrics], label="loss (next token)")
    if any("mtp_loss" in m for m in metrics):
        ax.plot(steps, [m.get("mtp_loss", float("nan")) for m in metrics], label="MTP loss (token t+2)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_stage(cfg: StageConfig, out: str | Path, resume: bool = False) -> Path:
    """Run a stage into directory `out`; returns the exported Hugging Face directory."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out)
    ckpt = out / "checkpoints" / "latest"
    if out.exists() and (out / "metrics.jsonl").exists() and not resume:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tokenizer = _model_and_tokenizer(cfg, out)
    rows, stats = build_rows(cfg, tokenizer)
    train_cfg = dataclasses.replace(cfg.train, total_steps=max(cfg.train.total_steps, cfg.max_steps)) \
        if cfg.train.total_steps < cfg.max_steps else cfg.train
    trainer = Trainer(model, train_cfg)
    metrics: list[dict] = []
    if resume and ckpt.exists():
        load_checkpoint(trainer, ckpt)
        with open(out / "metrics.jsonl") as f:
            metrics = [json.loads(l) for l in f if l.strip()][: trainer.step]
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    writer = SummaryWriter(str(out / "tensorboard"))
    t0 = time.perf_counter()
    with open(out / "metrics.jsonl", "a") as mfile, Progress(
            TextColumn(f"[bold]{cfg.stage}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn()) as progress:
        task = progress.add_task(cfg.stage, total=cfg.max_steps, completed=trainer.step, info="")
        while trainer.step < cfg.max_steps:
            m = trainer.train_step(batches_for_step(rows, trainer.step, cfg))
            m["tokens_per_s"] = m["tokens"] / max(time.perf_counter() - t0, 1e-9)
            t0 = time.perf_counter()
            metrics.append(m)
            mfile.write(json.dumps(m) + "\n")
            mfile.flush()
            if m["step"] % cfg.log_every == 0 or m["step"] == cfg.max_steps:
                for k, v in m.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, m["step"])
                progress.update(task, completed=m["step"], info=f"loss {m['loss']:.3f}  {m['tokens_per_s']:.0f} tok/s")
            if m["step"] % cfg.save_every == 0 or m["step"] == cfg.max_steps:
                save_checkpoint(trainer, ckpt, extra={"data_rows": int(rows["input_ids"].shape[0]),
                                                      "skipped_rows": stats.skipped})
    writer.close()
    if metrics:
        _plot(metrics, out / "loss.png")
    hf = out / "hf"
    save_pretrained(model, hf)
    tokenizer.save_pretrained(str(hf))
    return hf
