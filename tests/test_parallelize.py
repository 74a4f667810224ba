"""FSDP2 + expert parallelism (rlfoundry/model/parallelize.py): 2 processes on gloo train exactly
like 1 process on the whole batch — same losses, same final weights — with Muon, the MTP loss, the
balance loss and the loss-free bias update all on."""

import torch

from rlfoundry.model import Glm4MoeForCausalLM
from rlfoundry.train.distributed import spawn
from rlfoundry.train.trainer import Batch, Trainer, TrainConfig

from conftest import small_config

STEPS, BATCH, SEQ = 4, 4, 24


def _data(step: int) -> torch.Tensor:
    return torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _trainer(world: int, optimizer: str) -> Trainer:
    from rlfoundry.model.parallelize import parallelize

    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(small_config(n_routed_experts=4, num_experts_per_tok=2))
    model.init_weights(seed=0)
    if world > 1:
        parallelize(model)
    return Trainer(model, TrainConfig(lr=3e-3, warmup_steps=0, total_steps=STEPS, optimizer=optimizer,
                                      balance_loss_weight=1e-2, bias_update_rate=1e-2, grad_clip=0.5))


def _train(rank: int, world: int, optimizer: str, checkpoint_dir: str | None = None) -> dict:
    """STEPS steps; with `checkpoint_dir`, also save after step 2 and continue from it in a fresh
    trainer (sharded save and load on every rank)."""
    from rlfoundry.model.parallelize import full_state_dict
    from rlfoundry.train.checkpoint import load_checkpoint, save_checkpoint

    trainer = _trainer(world, optimizer)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    metrics = [trainer.train_step([Batch(_data(s)[rows])]) for s in range(STEPS)]
    out = {"metrics": metrics, "state": full_state_dict(trainer.model)}
    if checkpoint_dir:
        trainer = _trainer(world, optimizer)
        for s in range(2):
            trainer.train_step([Batch(_data(s)[rows])])
        save_checkpoint(trainer, checkpoint_dir)
        trainer = _trainer(world, optimizer)
        load_checkpoint(trainer, checkpoint_dir)
        out["resumed"] = [trainer.train_step([Batch(_data(s)[rows])]) for s in range(2, STEPS)]
        out["resumed_state"] = full_state_dict(trainer.model)
    return out


def _check(optimizer: str) -> None:
    one = _train(0, 1, optimizer)
    two = spawn(_train, 2, optimizer)
    for a, b in zip(one["metrics"], two["metrics"]):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a, b)
        assert a["tokens"] == b["tokens"]
    assert one["state"].keys() == two["state"].keys()
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    # the losses moved: the comparison covered real training
    assert one["metrics"][-1]["loss"] < one["metrics"][0]["loss"]


def test_fsdp2_expert_parallel_matches_one_process_muon():
    _check("muon")


def test_fsdp2_expert_parallel_matches_one_process_adamw():
    _check("adamw")


def test_fsdp2_expert_parallel_checkpoint_resume_is_exact(tmp_path):
    two = spawn(_train, 2, "muon", str(tmp_path / "ckpt"))
    assert two["resumed"] == two["metrics"][2:]
    for k, v in two["state"].items():
        assert torch.equal(two["resumed_state"][k], v), k
