"""Checkpoint files: atomic writes, only complete checkpoints are resumed from, rotation."""

import pytest
import torch

from fastft import checkpoint as ckpt
from fastft.distributed import DistEnv


def _state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_save_load_round_trip_with_rotation_and_rng(tmp_path):
    env = DistEnv()
    model, optimizer, scheduler = _state()
    for step in range(1, 4):
        _train_step(model, optimizer, scheduler)
        ckpt.save(tmp_path, step, model, optimizer, scheduler=scheduler, data_state={"epoch": 0, "consumed": step},
                  keep=2, env=env)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    expected_next = torch.rand(3)  # the RNG stream right after the save of step 3
    other, other_opt, other_sched = _state()
    state = ckpt.load(ckpt.latest(tmp_path), other, other_opt, scheduler=other_sched, env=env)
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "consumed": 3}
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)  # the same generator state
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert other_sched.last_epoch == scheduler.last_epoch
    # Same optimizer moments and schedule: the next step updates both models identically.
    for m, o, sc in ((model, optimizer, scheduler), (other, other_opt, other_sched)):
        torch.manual_seed(1)
        _train_step(m, o, sc)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_half_written_checkpoints_are_never_resumed_from(tmp_path):
    env = DistEnv()
    model, optimizer, scheduler = _state()
    ckpt.save(tmp_path, 5, model, optimizer, scheduler=scheduler, data_state={}, env=env)
    root = ckpt.checkpoint_dir(tmp_path)
    (root / "step_00000009.tmp").mkdir()  # a run died while writing step 9
    (root / "step_00000008").mkdir()  # renamed but never marked complete
    assert ckpt.latest(tmp_path).name == "step_00000005"
    with pytest.raises(FileNotFoundError, match="not a complete fastft checkpoint"):
        ckpt.load(root / "step_00000008", model, optimizer, scheduler=scheduler, env=env)
    # Writing step 9 again replaces the stale temporary folder.
    ckpt.save(tmp_path, 9, model, optimizer, scheduler=scheduler, data_state={}, env=env)
    assert ckpt.latest(tmp_path).name == "step_00000009" and not (root / "step_00000009.tmp").exists()


class _Boom:
    """A pickled callable: unpickling it would run os.system (here: it would only mark a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_trainer_state_that_carries_code(tmp_path):
    env = DistEnv()
    model, optimizer, scheduler = _state()
    path = ckpt.save(tmp_path, 1, model, optimizer, scheduler=scheduler, data_state={"epoch": 0, "consumed": 1},
                     env=env)
    marker = tmp_path / "code-ran"
    state = torch.load(path / "trainer_rank0.pt", weights_only=True)  # what fastft writes is plain data
    torch.save({**state, "scheduler": _Boom(marker)}, path / "trainer_rank0.pt")
    with pytest.raises(ckpt.UnsafeCheckpoint, match="refused to resume from this checkpoint"):
        ckpt.load(path, model, optimizer, scheduler=scheduler, env=env)
    assert not marker.exists(), "the checkpoint's code ran"


def test_resume_refuses_dcp_metadata_that_carries_code(tmp_path):
    import pickle

    env = DistEnv()
    model, optimizer, scheduler = _state()
    path = ckpt.save(tmp_path, 1, model, optimizer, scheduler=scheduler, data_state={}, env=env)
    marker = tmp_path / "code-ran"
    (path / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(ckpt.UnsafeCheckpoint, match=r"\.metadata: refused to resume"):
        ckpt.load(path, model, optimizer, scheduler=scheduler, env=env)
    assert not marker.exists(), "the checkpoint's code ran"
