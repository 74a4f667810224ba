"""The GLM-4.5 model family: configuration, the architecture, and Hugging Face checkpoint I/O."""

from .config import PRESETS, ConfigError, ModelConfig
from .glm4_moe import (
    CausalLMOutput,
    Glm4MoeForCausalLM,
    KVCache,
    apply_loss_free_bias_update,
    cast_model,
    expert_load,
    loss_free_bias_update,
    sequence_balance_loss,
)
from .hf_io import CheckpointError, load_pretrained, save_pretrained, to_hf_state_dict, update_from_tensors

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "CausalLMOutput", "Glm4MoeForCausalLM", "KVCache",
    "apply_loss_free_bias_update", "cast_model", "expert_load", "loss_free_bias_update",
    "sequence_balance_loss", "CheckpointError", "load_pretrained", "save_pretrained", "to_hf_state_dict",
    "update_from_tensors",
]
