"""ModelConfig: the GLM-4.5 architecture hyper-parameters, under Hugging Face `glm4_moe` field names.

A config is validated when it is built; every error names the field and the bad value. Presets
(`ModelConfig.from_preset`) reproduce the released GLM-4.5 and GLM-4.5-Air configurations and give a
tiny model for CPU work. `param_counts()` counts parameters from the shapes alone, the way the GLM-4.5
report does (MTP layer left out; "active" without the embedding and output matrices).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the source, the field and the value."""


@dataclass
class ModelConfig:
    vocab_size: int = 151552
    """Number of token ids (rows of the embedding and output matrices)."""
    hidden_size: int = 4096
    """Width D of the residual stream."""
    num_hidden_layers: int = 46
    """Number of decoder blocks in the main model (the MTP layers come on top of these)."""
    num_attention_heads: int = 96
    """Query heads per attention layer."""
    num_key_value_heads: int = 8
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""
    head_dim: int = 128
    """Channels per head. Explicit in GLM-4.5: it is NOT hidden_size / num_attention_heads."""
    intermediate_size: int = 10944
    """Hidden width of the dense SwiGLU MLP in the first `first_k_dense_replace` layers."""
    moe_intermediate_size: int = 1408
    """Hidden width of each routed expert (and, times n_shared_experts, of the shared expert)."""
    n_routed_experts: int = 128
    """Routed experts per MoE layer (E)."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer, always active, fused into one MLP of width n * moe_intermediate_size."""
    num_experts_per_tok: int = 8
    """Routed experts chosen per token (top-k)."""
    first_k_dense_replace: int = 1
    """The first k decoder blocks use the dense MLP instead of MoE."""
    n_group: int = 1
    """Expert groups for grouped top-k routing; must divide n_routed_experts."""
    topk_group: int = 1
    """Groups kept per token before the top-k choice among their experts (<= n_group)."""
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' sigmoid scores to sum to 1 before scaling."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed experts' gate weights (2.5 in GLM-4.5, 1.0 in Air)."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    partial_rotary_factor: float = 0.5
    """Fraction of each head's channels that rotate (the first ones, half-split rotation)."""
    use_qk_norm: bool = False
    """Per-head RMSNorm over head_dim on q and k, before RoPE."""
    attention_bias: bool = True
    """Bias on the q, k and v projections (never on the output projection)."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    max_position_embeddings: int = 131072
    """Longest sequence the model is meant for (the context length)."""
    num_nextn_predict_layers: int = 1
    """Multi-token-prediction layers (GLM-4.5 has one; it drafts tokens for speculative decoding)."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the output head."""
    hidden_act: str = "silu"
    """Activation of the gated MLPs; GLM-4.5 uses SiLU (SwiGLU) and it is the only one supported."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id, if the tokenizer has one."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token id(s)."""
    pad_token_id: int | None = None
    """Padding token id, if any."""

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self._validate("ModelConfig")

    def _validate(self, source: str) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"{source}: field '{name}' {why}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if not isinstance(value, int) or isinstance(value, bool):
                    fail(f.name, "must be an int")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    fail(f.name, "must be a number")
                setattr(self, f.name, float(value))
            elif f.type == "bool" and not isinstance(value, bool):
                fail(f.name, "must be true or false")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                fail(name, "must be positive")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            if getattr(self, name) <= 0:
                fail(name, "must be positive")
        if self.initializer_range < 0:
            fail("initializer_range", "must be >= 0")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not 0 < self.partial_rotary_factor <= 1:
            fail("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            fail("partial_rotary_factor", f"must give an even, non-zero rotary dim (head_dim={self.head_dim})")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be <= num_hidden_layers={self.num_hidden_layers}")
        if self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts // self.n_group < 2:
            fail("n_group", "must leave at least 2 experts per group (a group scores by its best two)")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be <= n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            fail("num_experts_per_tok", "must be <= the experts in the kept groups "
                 f"({self.topk_group} x {self.n_routed_experts // self.n_group})")
        if self.hidden_act != "silu":
            fail("hidden_act", "must be 'silu'")
        eos = self.eos_token_id
        if eos is not None and not (isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(e, int) for e in eos))):
            fail("eos_token_id", "must be an int, a list of ints or null")

    # ------------------------------------------------------------------ derived
    @property
    def rotary_dim(self) -> int:
        """Channels per head that RoPE rotates: head_dim * partial_rotary_factor."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Blocks from `first_k_dense_replace` on are MoE; MTP blocks (index >= num_hidden_layers) too."""
        return layer_idx >= self.first_k_dense_replace

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration: "glm-4.5", "glm-4.5-air" or "tiny"; keyword overrides replace fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"preset {name!r}: unknown field(s) {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face `glm4_moe` config dict (rope settings top level or in rope_parameters)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "glm4_moe":
            raise ConfigError(f"{source}: field 'model_type' must be 'glm4_moe', got {model_type!r}")
        d = dict(d)
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type' must be 'default', got {rope_type!r}")
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope and key not in d:
                d[key] = rope[key]
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        ignored = set(d) - known - _HF_BOOKKEEPING
        if ignored:
            warnings.warn(f"{source}: ignoring fields {sorted(ignored)}", stacklevel=2)
        if "head_dim" not in kwargs and "hidden_size" in kwargs and "num_attention_heads" in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        cfg = cls.__new__(cls)  # validated below with the file named in errors
        for f in fields(cls):
            setattr(cfg, f.name, kwargs.get(f.name, f.default))
        cfg._validate(source)
        return cfg

    def to_hf_dict(self) -> dict:
        """The config.json of a Hugging Face `glm4_moe` checkpoint (read by transformers, vLLM, SGLang)."""
        d = dataclasses.asdict(self)
        d.update({
            "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe",
            "attention_dropout": 0.0,
            "use_cache": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor},
        })
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_hf_dict(d, source=str(path))

    # ------------------------------------------------------------------ counting
    def param_counts(self, include_mtp: bool = False) -> dict[str, int]:
        """Total and active parameter counts from the shapes alone (no weights allocated).

        As the GLM-4.5 report counts: the MTP layer is left out (unless `include_mtp`), and "active"
        (parameters used per token) leaves out the embedding and output matrices.
        """
        D, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = D * q + 2 * D * kv + q * D + 2 * D  # q,k,v,o projections + the block's two RMSNorms
        if self.attention_bias:
            attn += q + 2 * kv
        if self.use_qk_norm:
            attn += 2 * hd
        dense_mlp = 3 * D * self.intermediate_size
        expert = 3 * D * self.moe_intermediate_size
        router = self.n_routed_experts * D + self.n_routed_experts  # weight + correction bias
        shared = self.n_shared_experts * expert
        moe_total = self.n_routed_experts * expert + shared + router
        moe_active = self.num_experts_per_tok * expert + shared + router
        n_dense, n_moe = self.first_k_dense_replace, self.num_moe_layers
        embed = self.vocab_size * D
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        total = embed + head + D + n_dense * (attn + dense_mlp) + n_moe * (attn + moe_total)
        active = D + n_dense * (attn + dense_mlp) + n_moe * (attn + moe_active)
        if include_mtp:
            mtp = 2 * D * D + 3 * D + attn + moe_total  # eh_proj, enorm/hnorm/shared_head.norm, block
            total += self.num_nextn_predict_layers * mtp
            active += self.num_nextn_predict_layers * (mtp - moe_total + moe_active)
        return {"total": total, "active": active, "embedding": embed, "output_head": head}


_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "auto_map",
    "rope_scaling", "rope_parameters", "num_mtp_layers", "_name_or_path", "quantization_config",
    "moe_layer_freq", "topk_method", "scoring_func", "ep_size",
}

PRESETS: dict[str, dict[str, Any]] = {
    # GLM-4.5 (355B total, 32B active), zai-org/GLM-4.5 config.json.
    "glm-4.5": dict(
        vocab_size=151552, hidden_size=5120, num_hidden_layers=92, num_attention_heads=96,
        num_key_value_heads=8, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
        n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_theta=1_000_000.0, partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True,
        rms_norm_eps=1e-5, max_position_embeddings=131072, num_nextn_predict_layers=1,
        tie_word_embeddings=False, eos_token_id=[151329, 151336, 151338], pad_token_id=151329,
    ),
    # GLM-4.5-Air (106B total, 12B active), zai-org/GLM-4.5-Air config.json.
    "glm-4.5-air": dict(
        vocab_size=151552, hidden_size=4096, num_hidden_layers=46, num_attention_heads=96,
        num_key_value_heads=8, head_dim=128, intermediate_size=10944, moe_intermediate_size=1408,
        n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        rope_theta=1_000_000.0, partial_rotary_factor=0.5, use_qk_norm=False, attention_bias=True,
        rms_norm_eps=1e-5, max_position_embeddings=131072, num_nextn_predict_layers=1,
        tie_word_embeddings=False, eos_token_id=[151329, 151336, 151338], pad_token_id=151329,
    ),
    # A few-million-parameter model with every GLM-4.5 feature, for CPU work and tests:
    # deep-and-narrow, GQA, QK-Norm, partial RoPE, 1 leading dense layer, MoE with a shared
    # expert, routed scaling, and one MTP layer.
    "tiny": dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=384, moe_intermediate_size=64,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_theta=10_000.0, partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True,
        rms_norm_eps=1e-5, max_position_embeddings=2048, num_nextn_predict_layers=1,
        tie_word_embeddings=False,
    ),
}
