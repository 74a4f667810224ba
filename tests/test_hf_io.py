"""Hugging Face checkpoints: what we save loads in transformers with the same logits and back."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_twin, random_model, small_config
from rlfoundry.model import CheckpointError, load_pretrained, save_pretrained


def _ids(cfg, B=2, T=13):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(7))


def test_save_then_transformers_load_gives_same_logits(tmp_ckpt):
    from transformers import AutoModelForCausalLM

    cfg = small_config(n_group=2, topk_group=1)
    model = random_model(cfg)
    save_pretrained(model, tmp_ckpt)
    names = load_file(tmp_ckpt / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names       # per-expert names on disk
    assert f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in names  # MTP at layers.{N}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_ckpt, dtype=torch.float32).eval()
    ids = _ids(cfg)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-5
    # and the correction bias came through
    assert torch.equal(hf.model.layers[1].mlp.gate.e_score_correction_bias,
                       model.moe_routers()[0].e_score_correction_bias)


def test_round_trip_keeps_every_tensor_including_mtp(tmp_ckpt):
    model = random_model(small_config())
    save_pretrained(model, tmp_ckpt)
    loaded = load_pretrained(tmp_ckpt)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_transformers_saved_checkpoint(tmp_ckpt):
    cfg = small_config()
    hf = hf_twin(random_model(cfg, seed=11))
    hf.save_pretrained(tmp_ckpt)
    with pytest.warns(UserWarning, match="no MTP tensors"):
        ours = load_pretrained(tmp_ckpt)
    assert ours.config.num_nextn_predict_layers == 0
    ids = _ids(cfg)
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.3\."):
        load_pretrained(tmp_ckpt, mtp="require")


def test_sharded_save_with_index_loads_in_both(tmp_ckpt):
    from transformers import AutoModelForCausalLM

    cfg = small_config()
    model = random_model(cfg)
    save_pretrained(model, tmp_ckpt, max_shard_size="40KB")
    index = json.loads((tmp_ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_ckpt / "model.safetensors").exists()
    ids = _ids(cfg)
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(load_pretrained(tmp_ckpt)(ids).logits, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(tmp_ckpt, dtype=torch.float32).eval()
        assert (hf(ids).logits - ref).abs().max().item() <= 1e-5
    # saving again unsharded removes the index and the old shards
    save_pretrained(model, tmp_ckpt)
    assert sorted(p.name for p in tmp_ckpt.iterdir()) == ["config.json", "model.safetensors"]


def test_fused_expert_names_are_accepted(tmp_ckpt):
    model = random_model(small_config())
    save_pretrained(model, tmp_ckpt, fused_experts=True)
    assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(tmp_ckpt / "model.safetensors")
    loaded = load_pretrained(tmp_ckpt)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_bf16_load_keeps_router_in_fp32(tmp_ckpt):
    model = random_model(small_config())
    save_pretrained(model, tmp_ckpt)
    loaded = load_pretrained(tmp_ckpt, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    for router in loaded.moe_routers():
        assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        out = loaded(_ids(model.config)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------- bad checkpoints
def _saved(tmp_ckpt):
    save_pretrained(random_model(small_config()), tmp_ckpt)
    return tmp_ckpt


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config.json: field 'model_type' must be 'glm4_moe'"):
        load_pretrained(tmp_path)


def test_bad_config_field(tmp_ckpt):
    _saved(tmp_ckpt)
    cfg = json.loads((tmp_ckpt / "config.json").read_text())
    cfg["num_experts_per_tok"] = 0
    (tmp_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: field 'num_experts_per_tok' must be positive, got 0"):
        load_pretrained(tmp_ckpt)


def test_missing_and_misshaped_tensors_are_named(tmp_ckpt):
    _saved(tmp_ckpt)
    f = tmp_ckpt / "model.safetensors"
    tensors = load_file(f)
    good = dict(tensors)
    del tensors["model.layers.2.self_attn.k_proj.bias"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2.self_attn.k_proj.bias'"):
        load_pretrained(tmp_ckpt)
    tensors = dict(good)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.1.mlp.experts.5.up_proj.weight"):
        load_pretrained(tmp_ckpt)
    tensors = dict(good)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has shape \(3,\), the config needs \(64,\)"):
        load_pretrained(tmp_ckpt)
    tensors = dict(good)
    tensors["model.layers.0.mystery.weight"] = torch.ones(3)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.0.mystery.weight'"):
        load_pretrained(tmp_ckpt)
    f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_ckpt)
