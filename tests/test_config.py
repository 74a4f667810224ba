import json

import pytest

from rlfoundry.model import ConfigError, ModelConfig


def test_glm45_preset_matches_release():
    c = ModelConfig.from_preset("glm-4.5")
    assert (c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (5120, 92, 3)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (96, 8, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (160, 1, 8)
    assert (c.moe_intermediate_size, c.intermediate_size) == (1536, 12288)
    assert c.routed_scaling_factor == 2.5 and c.use_qk_norm and c.attention_bias
    assert (c.partial_rotary_factor, c.rope_theta, c.vocab_size) == (0.5, 1e6, 151552)
    assert c.num_nextn_predict_layers == 1 and not c.tie_word_embeddings and c.rotary_dim == 64


def test_air_preset_matches_release():
    c = ModelConfig.from_preset("glm-4.5-air")
    assert (c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (4096, 46, 1)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.intermediate_size) == (128, 1408, 10944)
    assert c.routed_scaling_factor == 1.0 and not c.use_qk_norm


@pytest.mark.parametrize("name,total,active", [("glm-4.5", 355e9, 32e9), ("glm-4.5-air", 106e9, 12e9)])
def test_param_counts_match_report(name, total, active):
    counts = ModelConfig.from_preset(name).param_counts()
    assert abs(counts["total"] - total) / total < 0.01, counts
    assert abs(counts["active"] - active) / active < 0.02, counts


def test_param_counts_equal_real_model():
    from rlfoundry.model import Glm4MoeForCausalLM

    cfg = ModelConfig.from_preset("tiny")
    model = Glm4MoeForCausalLM(cfg)
    n_mtp = sum(p.numel() for p in model.model.mtp_layers.parameters())
    n_all = sum(p.numel() for p in model.parameters()) + sum(
        r.e_score_correction_bias.numel() for r in model.moe_routers())
    n_mtp += sum(r.e_score_correction_bias.numel() for r in model.moe_routers()[cfg.num_moe_layers:])
    assert cfg.param_counts()["total"] == n_all - n_mtp
    assert cfg.param_counts(include_mtp=True)["total"] == n_all


@pytest.mark.parametrize("field,value,fragment", [
    ("hidden_size", -1, "'hidden_size' must be positive"),
    ("num_key_value_heads", 3, "'num_key_value_heads' must divide"),
    ("topk_group", 2, "'topk_group' must be <= n_group"),
    ("use_qk_norm", "yes", "'use_qk_norm' must be true or false"),
    ("head_dim", 8.5, "'head_dim' must be an int"),
    ("hidden_act", "gelu", "'hidden_act' must be 'silu'"),
    ("first_k_dense_replace", 9, "'first_k_dense_replace' must be <="),
])
def test_validation_names_field_and_value(field, value, fragment):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", **{field: value})
    assert fragment in str(e.value) and repr(value) in str(e.value)


def test_hf_dict_round_trip_and_legacy_rope_keys(tmp_path):
    c = ModelConfig.from_preset("tiny", n_group=4, topk_group=2)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    legacy = c.to_hf_dict()
    legacy.pop("rope_parameters")
    legacy.update(rope_theta=5e5, partial_rotary_factor=0.25)
    assert ModelConfig.from_hf_dict(legacy).rope_theta == 5e5
    only_nested = c.to_hf_dict()
    del only_nested["rope_theta"], only_nested["partial_rotary_factor"]
    only_nested["rope_parameters"]["rope_theta"] = 123.0
    assert ModelConfig.from_hf_dict(only_nested).rope_theta == 123.0


def test_bad_config_file_errors_name_file_and_field(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**ModelConfig.from_preset("tiny").to_hf_dict(), "num_hidden_layers": "four"}))
    with pytest.raises(ConfigError, match=r"config.json: field 'num_hidden_layers' must be an int, got 'four'"):
        ModelConfig.from_json_file(f)
    f.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'model_type' must be 'glm4_moe', got 'llama'"):
        ModelConfig.from_json_file(f)
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        ModelConfig.from_json_file(f)
