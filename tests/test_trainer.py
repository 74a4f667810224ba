"""Packing, the trainer's step, and exact resume from a sharded checkpoint."""

import math

import pytest
import torch

from conftest import small_config
from rlfoundry.data.packing import best_fit_pack, pack_stream, packed_loss_mask
from rlfoundry.model import Glm4MoeForCausalLM
from rlfoundry.train.checkpoint import load_checkpoint, save_checkpoint
from rlfoundry.train.schedule import batch_size_warmup, warmup_cosine
from rlfoundry.train.trainer import Batch, TrainConfig, Trainer


def test_pack_stream_and_best_fit():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    ids, seg, pos = pack_stream(docs, seq_len=5, eos_id=0)
    assert ids.tolist() == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8], [9, 10, 0, 11, 0]]
    assert seg.tolist() == [[0, 0, 0, 0, 1], [1, 1, 2, 2, 2], [2, 2, 2, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    assert packed_loss_mask(seg).tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 1, 1], [0, 1, 1, 0, 1]]
    ids, seg, pos, mask = best_fit_pack([[1] * 5, [2] * 3, [3] * 2, [4] * 4, [5]], seq_len=6, pad_id=0)
    assert torch.equal(mask, packed_loss_mask(seg))
    assert sorted(sorted(set(r.tolist()) - {0}) for r in ids) == [[1, 5], [2], [3, 4]]  # best fit: 5+1, 4+2, 3
    assert (seg == -1).sum() == 18 - 15 and all(len(set(r.tolist())) > 0 for r in seg)


def test_schedules():
    assert warmup_cosine(0, 1.0, 0.1, 10, 110) == 0.1
    assert warmup_cosine(9, 1.0, 0.1, 10, 110) == 1.0
    assert abs(warmup_cosine(60, 1.0, 0.1, 10, 110) - 0.55) < 1e-9
    assert warmup_cosine(500, 1.0, 0.1, 10, 110) == 0.1
    assert batch_size_warmup(0, 16, 64, 1000, 8) == 16 and batch_size_warmup(500, 16, 64, 1000, 8) == 40
    assert batch_size_warmup(2000, 16, 64, 1000, 8) == 64


def _batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(1, cfg.vocab_size, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(200)]
    ids, seg, pos = pack_stream(docs, 16, eos_id=0)
    return [[Batch(ids[i * 4:(i + 1) * 4], packed_loss_mask(seg[i * 4:(i + 1) * 4]), seg[i * 4:(i + 1) * 4],
                   pos[i * 4:(i + 1) * 4])] for i in range(n)]


def _trainer(cfg):
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(cfg)
    return Trainer(model, TrainConfig(lr=3e-3, warmup_steps=2, total_steps=20, bias_update_rate=1e-3))


def test_training_lowers_loss_and_updates_the_balance_bias():
    cfg = small_config(initializer_range=0.02)
    trainer = _trainer(cfg)
    batches = _batches(cfg, 12)
    first = trainer.train_step(batches[0])
    for b in batches[1:]:
        last = trainer.train_step(b)
    assert last["loss"] < first["loss"] and {"mtp_loss", "balance_loss", "lr", "tokens", "grad_norm"} <= set(last)
    assert trainer.model.moe_routers()[0].e_score_correction_bias.abs().sum() > 0


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    cfg = small_config(initializer_range=0.02)
    batches = _batches(cfg, 8)
    full = _trainer(cfg)
    reference = [full.train_step(b)["loss"] for b in batches]

    first = _trainer(cfg)
    for b in batches[:4]:
        first.train_step(b)
    save_checkpoint(first, tmp_path / "ckpt", extra={"batch": 4})
    del first
    resumed = _trainer(cfg)
    torch.manual_seed(123)  # whatever happened since: the checkpoint restores the RNG too
    extra = load_checkpoint(resumed, tmp_path / "ckpt")
    assert extra == {"batch": 4} and resumed.step == 4
    losses = [resumed.train_step(b)["loss"] for b in batches[extra["batch"]:]]
    assert losses == reference[4:]
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))


def test_activation_checkpointing_gives_the_same_gradients_and_bf16_trains():
    cfg = small_config(initializer_range=0.02)
    batch = _batches(cfg, 1)[0]
    grads = []
    for ckpt in (False, True):
        trainer = Trainer(Glm4MoeForCausalLM(cfg), TrainConfig(activation_checkpointing=ckpt))
        torch.manual_seed(0)
        trainer.model.init_weights(seed=0)
        trainer.model.train()
        loss, _ = trainer._loss(batch[0])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    trainer = Trainer(Glm4MoeForCausalLM(cfg), TrainConfig(bf16=True, lr=3e-3, warmup_steps=1))
    first = trainer.train_step(_batches(cfg, 1)[0])["loss"]
    for b in _batches(cfg, 6, seed=1):
        last = trainer.train_step(b)["loss"]
    assert math.isfinite(last) and last < first


def test_compiled_training_gives_the_eager_loss_and_gradients():
    """TrainConfig.compile: the model traced by torch.compile, with the expert GEMMs as custom ops
    whose backward (rlfoundry::grouped_mm / grouped_wgrad) is ours, not autograd's. The aot_eager
    backend runs that traced forward and backward in seconds; inductor adds fused kernels (compiling
    them takes minutes here: benchmarks/bench_model.py checks its logits and reports its speed)."""
    cfg = small_config(initializer_range=0.02)
    batch = _batches(cfg, 1)[0][0]
    results = []
    for backend in ("", "aot_eager"):
        trainer = Trainer(Glm4MoeForCausalLM(cfg), TrainConfig(compile=backend, optimizer="adamw"))
        assert (trainer.forward_model is trainer.model) == (backend == "")
        trainer.model.init_weights(seed=0)
        trainer.model.train()
        loss, metrics = trainer._loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        assert all(p.grad.is_contiguous() for p in trainer.model.parameters() if p.grad is not None)
        results.append((loss.item(), metrics["_routed"], grads))
    (eager_loss, eager_routed, eager), (comp_loss, comp_routed, comp) = results
    assert abs(eager_loss - comp_loss) <= 1e-5 and torch.equal(eager_routed, comp_routed)
    assert eager.keys() == comp.keys() and any("experts.gate_up_proj" in n for n in comp)
    for n in eager:
        assert (eager[n] - comp[n]).abs().max().item() <= 1e-5, n
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="no-such-backend")


def test_frozen_parameters_stay_fixed():
    cfg = small_config(initializer_range=0.02)
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, TrainConfig(lr=3e-3, warmup_steps=1, freeze=["*.mlp.gate.weight", "model.embed_tokens.*"]))
    trainer.train_step(_batches(cfg, 1)[0])
    frozen = [n for n in before if n.endswith("mlp.gate.weight") or n.startswith("model.embed_tokens.")]
    assert len(frozen) == 1 + cfg.num_moe_layers + cfg.num_nextn_predict_layers
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
    try:
        Trainer(Glm4MoeForCausalLM(cfg), TrainConfig(freeze=["*.no_such_weight"]))
    except ValueError as e:
        assert "freeze" in str(e) and "no_such_weight" in str(e)
    else:
        raise AssertionError("a pattern that matches nothing must be rejected")
