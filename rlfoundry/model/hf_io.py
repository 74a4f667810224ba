"""Hugging Face `glm4_moe` checkpoints in and out: config.json + safetensors (sharded with an index).

Names on disk are those of the released GLM-4.5 checkpoints: experts one by one
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`) and the MTP layer at
`model.layers.{num_hidden_layers + j}.*`. Loading also accepts the fused expert names of
transformers 5.x (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). In memory the model uses
the fused layout, and MTP layers live at `model.mtp_layers.{j}`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .glm4_moe import Glm4MoeForCausalLM

SAFE_INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Copies of shared tensors that some MTP checkpoints carry (DeepSeek-V3 style); the model shares them.
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class CheckpointError(ValueError):
    """A checkpoint directory is not a usable glm4_moe checkpoint; the message names file and tensor."""


# ----------------------------------------------------------------------------- names
def to_hf_state_dict(model: Glm4MoeForCausalLM, fused_experts: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) pairs in the released checkpoint layout (per-expert names
    unless `fused_experts`). Used for saving and for pushing weights to inference engines."""
    N = model.config.num_hidden_layers
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        m = re.match(r"^model\.mtp_layers\.(\d+)\.(.*)$", name)
        if m:
            name = f"model.layers.{N + int(m.group(1))}.{m.group(2)}"
        if not fused_experts and name.endswith(".mlp.experts.gate_up_proj"):
            prefix, I = name[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :I]
                yield f"{prefix}.{e}.up_proj.weight", t[e, I:]
        elif not fused_experts and name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def _internal_name(name: str, cfg: ModelConfig) -> str | None:
    """Checkpoint name -> name in our module (None: a shared copy to skip)."""
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        if m.group(2) in _MTP_SHARED_COPIES:
            return None
        return f"model.mtp_layers.{int(m.group(1)) - cfg.num_hidden_layers}.{m.group(2)}"
    return name


# ----------------------------------------------------------------------------- reading
def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = path / SAFE_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files and no {SAFE_INDEX}")
    files = {}
    for f in shards:
        try:
            with safe_open(f, "pt") as sf:
                names = list(sf.keys())
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
        files.update((name, f) for name in names)
    return files


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", mtp: str = "auto") -> Glm4MoeForCausalLM:
    """Load a Hugging Face `glm4_moe` directory into our model.

    `mtp`: "auto" loads the MTP layer when the checkpoint has its tensors and drops it (with a
    warning) when it has none of them — transformers' own `save_pretrained` does not write it;
    "require" makes its absence an error; "drop" never loads it.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if mtp not in ("auto", "require", "drop"):
        raise ValueError(f"mtp must be 'auto', 'require' or 'drop', got {mtp!r}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json — not a Hugging Face checkpoint directory")
    try:
        cfg = ModelConfig.from_json_file(cfg_file)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = _tensor_files(path)

    has_mtp = any((_internal_name(n, cfg) or "").startswith("model.mtp_layers.") for n in files)
    if cfg.num_nextn_predict_layers and (mtp == "drop" or (mtp == "auto" and not has_mtp)):
        if mtp == "auto":
            warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but "
                          "the checkpoint holds no MTP tensors; loading without the MTP layer", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = Glm4MoeForCausalLM(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    # Group per-expert tensors so that they can be stacked into the fused layout.
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, tuple[Path, str]]]] = defaultdict(lambda: defaultdict(dict))
    handles: dict[Path, object] = {}

    def read(f: Path, name: str) -> torch.Tensor:
        if f not in handles:
            try:
                handles[f] = safe_open(f, "pt", device="cpu")
            except Exception as e:  # corrupt or truncated file
                raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
        return handles[f].get_tensor(name)

    for name, f in files.items():
        internal = _internal_name(name, cfg)
        if internal is None:
            continue
        if internal.startswith("model.mtp_layers.") and cfg.num_nextn_predict_layers == 0:
            continue
        m = _EXPERT.match(internal)
        if m:
            experts[m.group(1)][int(m.group(2))][m.group(3)] = (f, name)
            continue
        if internal == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if internal not in expected:
            raise CheckpointError(f"{f}: unexpected tensor {name!r} for this config")
        state[internal] = read(f, name)

    E = cfg.n_routed_experts
    for prefix, per_expert in experts.items():
        disk_prefix = _checkpoint_name(prefix, cfg)
        for e in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if proj not in per_expert.get(e, {}):
                    raise CheckpointError(f"{path}: missing tensor {disk_prefix}.{e}.{proj}.weight "
                                          f"(n_routed_experts={E})")
        extra = set(per_expert) - set(range(E))
        if extra:
            raise CheckpointError(f"{path}: tensor {disk_prefix}.{min(extra)}.* is beyond n_routed_experts={E}")
        gate_up, down = [], []
        for e in range(E):
            g, u, d = (read(*per_expert[e][p]) for p in ("gate_proj", "up_proj", "down_proj"))
            if g.shape != u.shape:
                raise CheckpointError(f"{per_expert[e]['up_proj'][0]}: tensor {per_expert[e]['up_proj'][1]} has "
                                      f"shape {tuple(u.shape)}, gate_proj has {tuple(g.shape)}")
            gate_up.append(torch.cat([g, u], dim=0))
            down.append(d)
        state[prefix + ".gate_up_proj"] = torch.stack(gate_up)
        state[prefix + ".down_proj"] = torch.stack(down)

    for name, t in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: missing tensor {_checkpoint_name(name, cfg)!r}")
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {_checkpoint_name(name, cfg)!r} has shape "
                                  f"{tuple(state[name].shape)}, the config needs {tuple(t.shape)}")

    fp32_names = {n for n in expected if n.endswith(".mlp.gate.weight") or n.endswith("e_score_correction_bias")}
    state = {n: t.to(device=device, dtype=torch.float32 if n in fp32_names else dtype) for n, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _checkpoint_name(internal: str, cfg: ModelConfig) -> str:
    m = re.match(r"^model\.mtp_layers\.(\d+)\.(.*)$", internal)
    name = f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else internal
    name = name.replace(".mlp.experts.gate_up_proj", ".mlp.experts.{e}.gate_proj/up_proj.weight")
    return name.replace(".mlp.experts.down_proj", ".mlp.experts.{e}.down_proj.weight")


# ----------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
    return int(float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(2)])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model: Glm4MoeForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "2GB",
                    dtype: torch.dtype | None = None, fused_experts: bool = False) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_size`).

    Each file is written to a temporary name and renamed, so an interrupted save never leaves a
    half-written file under a real name; shards of an earlier save at this path are removed.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tensors = []
    for name, t in to_hf_state_dict(model, fused_experts=fused_experts):
        t = t.detach()
        if dtype is not None and not (name.endswith(".mlp.gate.weight") or name.endswith("e_score_correction_bias")):
            t = t.to(dtype)
        tensors.append((name, t.to("cpu").contiguous()))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    stale = set(path.glob("model*.safetensors")) | {path / SAFE_INDEX}
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        _atomic_write(path / fname, lambda p: save_file(shard, str(p), metadata={"format": "pt"}))
    if len(shards) > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(path / SAFE_INDEX, lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))
    for old in stale - {path / n for n in names} - ({path / SAFE_INDEX} if len(shards) > 1 else set()):
        old.unlink(missing_ok=True)
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(dtype or model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    _atomic_write(path / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return path


# ----------------------------------------------------------------------------- in-place updates
@torch.no_grad()
def update_from_tensors(model: Glm4MoeForCausalLM, named_tensors) -> int:
    """Copy (name, tensor) pairs into the model in place — a full state dict or any subset.

    Names may be checkpoint names (per-expert or fused experts, MTP at `model.layers.{N}`) or our
    own; tensors are cast to the parameter's dtype. Returns how many tensors were copied. An unknown
    name or a wrong shape raises before that tensor is written.
    """
    cfg = model.config
    params = model.state_dict(keep_vars=True)
    copied = 0
    for name, t in (named_tensors.items() if isinstance(named_tensors, dict) else named_tensors):
        internal = _internal_name(name, cfg)
        if internal is None:
            continue
        m = _EXPERT.match(internal)
        if m:
            prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if prefix + ".down_proj" not in params or e >= cfg.n_routed_experts:
                raise CheckpointError(f"unknown tensor {name!r}")
            if proj == "down_proj":
                target = params[prefix + ".down_proj"][e]
            else:
                gate_up = params[prefix + ".gate_up_proj"]
                I = gate_up.shape[1] // 2
                target = gate_up[e, :I] if proj == "gate_proj" else gate_up[e, I:]
        elif internal in params:
            target = params[internal]
        else:
            raise CheckpointError(f"unknown tensor {name!r}")
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, the model needs {tuple(target.shape)}")
        target.copy_(t)
        copied += 1
    return copied


def read_tensors(path: str | os.PathLike):
    """Yield (checkpoint name, tensor) for every tensor of a checkpoint directory (for in-place updates)."""
    files = _tensor_files(Path(path))
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in files.items():
        by_file[f].append(name)
    for f, names in by_file.items():
        with safe_open(f, "pt", device="cpu") as sf:
            for name in names:
                yield name, sf.get_tensor(name)
