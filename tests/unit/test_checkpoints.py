"""Step checkpoints (tasks/checkpoints.py): atomic, the newest kept, matched to the configuration before anything else
is read, tensors through torch.distributed.checkpoint and the rest as JSON (no pickle)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_pipeline.tasks.checkpoints import latest_step, load_step, save_step, step_seed


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _tensors(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def test_checkpoints_are_atomic_keep_the_newest_and_match_the_configuration(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for step in (1, 2, 3):
        save_step(tmp_path, step, _tensors(model, optimizer),
                  {"config_hash": "h" if step < 3 else "other", "step": step}, keep=2)
    (tmp_path / ".tmp-cut-short").mkdir()  # a write that a kill interrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-cut-short", "step-000002", "step-000003"]
    folder, state = latest_step(tmp_path, "h")
    assert folder.name == "step-000002" and state["step"] == 2
    assert not (tmp_path / ".tmp-cut-short").exists()
    assert latest_step(tmp_path, "unknown") is None
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "tensors"]
    assert json.loads((folder / "state.json").read_text()) == {"config_hash": "h", "step": 2}


def test_weights_and_optimizer_state_come_back_exactly(tmp_path):
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, optimizer = _model_and_optimizer(0)
    save_step(tmp_path, 7, _tensors(model, optimizer), {"config_hash": "h", "step": 7}, keep=1)
    other, other_opt = _model_and_optimizer(1)
    assert not torch.equal(other.weight, model.weight)
    tensors = _tensors(other, other_opt)
    folder, _ = latest_step(tmp_path, "h")
    load_step(folder, tensors)
    set_state_dict(other, other_opt, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    saved = optimizer.state_dict()["state"][0]
    loaded = other_opt.state_dict()["state"][0]
    assert torch.equal(saved["exp_avg"], loaded["exp_avg"]) and torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])


def test_a_planted_pickle_is_never_loaded(tmp_path):
    """A checkpoint folder holds no pickle to load: a planted ``state.pt`` that would run code is ignored, and a
    folder whose ``state.json`` is not this configuration's has none of its tensors read."""
    model, optimizer = _model_and_optimizer(0)
    folder = save_step(tmp_path, 1, _tensors(model, optimizer), {"config_hash": "h", "step": 1}, keep=1)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle was loaded')",))

    torch.save({"config_hash": "h", "boom": Boom()}, folder / "state.pt")
    found, state = latest_step(tmp_path, "h")
    assert state == {"config_hash": "h", "step": 1}
    (folder / "state.json").write_text('{"config_hash": "someone else", "step": 1}')
    assert latest_step(tmp_path, "h") is None
    (folder / "state.json").write_text("not json")
    assert latest_step(tmp_path, "h") is None


def test_step_seeds_differ_by_step_and_salt_and_repeat():
    assert step_seed(1, 2, "sample", 0) == step_seed(1, 2, "sample", 0)
    seeds = {step_seed(1, 2, "sample", 0), step_seed(1, 3, "sample", 0), step_seed(1, 2, "sample", 1),
             step_seed(1, 2, "prompts"), step_seed(2, 2, "sample", 0)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(TypeError):
        step_seed()  # type: ignore[call-arg]
