"""Shared helpers: random GLM-4.5 models and their transformers twins on the same weights."""

import os
import warnings

import pytest
import torch

from rlfoundry.model import Glm4MoeForCausalLM, ModelConfig

warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


def pytest_configure(config):
    """The tests check what compiled graphs compute, not how fast they run: inductor builds their
    C++ at -O0 in a test session (the same kernels; a third of -O3's compile time, which dominates a
    cold cache), unless the environment says otherwise. `optimized_cpp` puts a test back on -O3, as
    the engine builds it. Set here, not at import: a script importing these helpers (a benchmark
    reusing `random_model`) keeps -O3 and its speed."""
    os.environ.setdefault("TORCHINDUCTOR_DEBUG_COMPILE", "1")


@pytest.fixture
def optimized_cpp(monkeypatch):
    """Inductor's C++ built at -O3 as outside the tests (read when a graph is compiled)."""
    monkeypatch.setenv("TORCHINDUCTOR_DEBUG_COMPILE", "0")


def small_config(**overrides) -> ModelConfig:
    """A fast configuration with every GLM-4.5 feature on; overrides switch features."""
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                n_group=1, topk_group=1, routed_scaling_factor=2.5, rope_theta=10000.0,
                partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True,
                max_position_embeddings=256, num_nextn_predict_layers=1, initializer_range=0.1)
    base.update(overrides)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0) -> Glm4MoeForCausalLM:
    """Random weights everywhere, including norm weights, biases and the correction biases, so
    that every parameter matters in a comparison."""
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
        for router in model.moe_routers():
            router.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


def hf_twin(model: Glm4MoeForCausalLM):
    """transformers' Glm4MoeForCausalLM with the same weights (the main model; HF has no MTP)."""
    from transformers import Glm4MoeConfig
    from transformers import Glm4MoeForCausalLM as HFGlm4Moe

    d = model.config.to_hf_dict()
    d.pop("architectures"), d.pop("model_type")
    hf = HFGlm4Moe(Glm4MoeConfig(**d))
    state = {k: v for k, v in model.state_dict().items() if ".mtp_layers." not in k}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny-preset checkpoint (random weights) with a trained byte-level BPE tokenizer and chat template."""
    from rlfoundry.data.tokenizer import train_tokenizer
    from rlfoundry.model import save_pretrained

    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    corpus = [f"{a} + {b} = {a + b}. The quick brown fox jumps over the lazy dog." for a in range(60) for b in range(9)]
    train_tokenizer(corpus, 512, path)
    cfg = ModelConfig.from_preset("tiny", max_position_embeddings=256)
    model = Glm4MoeForCausalLM(cfg)
    model.init_weights(seed=3)
    save_pretrained(model, path)
    return path
