import json

import numpy as np
import pytest

import distsgd
from distsgd.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from distsgd.optimizers import SGD


def _model(seed=0, hidden=3):
    rng = np.random.default_rng(seed)
    w = distsgd.Variable(rng.standard_normal((2, hidden)), name="dense/kernel")
    b = distsgd.Variable(rng.standard_normal(hidden), name="dense/bias")
    local = distsgd.Variable(np.zeros(2), name="local",
                             synchronization=distsgd.VariableSynchronization.NONE)
    return [w, b, local], SGD(0.1, momentum=0.9, nesterov=True)


def _train(variables, opt, steps, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.apply_gradients([(rng.standard_normal(v.shape), v) for v in variables])


def test_round_trip_restores_everything_and_continues_identically(tmp_path):
    variables, opt = _model()
    _train(variables, opt, 3)
    opt.learning_rate = 0.05
    path = save_checkpoint(tmp_path, step=3, variables=variables, optimizer=opt,
                           state={"global_step": 3})
    assert path.name == "ckpt-0000000003" and latest_checkpoint(tmp_path) == path
    restored_vars, restored_opt = _model(seed=9)
    state = load_checkpoint(tmp_path, variables=restored_vars, optimizer=restored_opt)
    assert state == {"global_step": 3}
    assert state_digest(restored_vars + restored_opt.weights) == \
        state_digest(variables + opt.weights)
    assert float(restored_opt.lr.numpy()) == pytest.approx(0.05)
    _train(variables, opt, 2, seed=5)
    _train(restored_vars, restored_opt, 2, seed=5)
    assert state_digest(restored_vars + restored_opt.weights) == \
        state_digest(variables + opt.weights)


def test_keeps_the_newest_and_ignores_interrupted_writes(tmp_path):
    variables, opt = _model()
    for step in range(1, 6):
        _train(variables, opt, 1)
        save_checkpoint(tmp_path, step=step, variables=variables, optimizer=opt, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000000004",
                                                               "ckpt-0000000005"]
    # a writer killed half way leaves a temporary directory and maybe no `latest`
    (tmp_path / ".tmp-ckpt-0000000006-deadbeef").mkdir()
    (tmp_path / ".tmp-ckpt-0000000006-deadbeef" / "arrays.npz").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "ckpt-0000000005"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "ckpt-0000000005"
    fresh_vars, fresh_opt = _model()
    load_checkpoint(tmp_path, variables=fresh_vars, optimizer=fresh_opt)
    assert int(fresh_opt.iterations.numpy()) == 5


def test_saving_the_same_step_again_replaces_it(tmp_path):
    variables, opt = _model()
    save_checkpoint(tmp_path, step=1, variables=variables, optimizer=opt)
    _train(variables, opt, 1)
    save_checkpoint(tmp_path, step=1, variables=variables, optimizer=opt)
    fresh_vars, fresh_opt = _model()
    load_checkpoint(tmp_path, variables=fresh_vars, optimizer=fresh_opt)
    assert int(fresh_opt.iterations.numpy()) == 1


def _saved(tmp_path):
    variables, opt = _model()
    _train(variables, opt, 1)
    return save_checkpoint(tmp_path, step=1, variables=variables, optimizer=opt)


@pytest.mark.parametrize(("damage", "match"), [
    (lambda p: (p / "arrays.npz").write_bytes((p / "arrays.npz").read_bytes()[:100]),
     "arrays.npz is corrupt or truncated"),
    (lambda p: (p / "rank-00000.npz").unlink(), "rank-00000.npz is missing"),
    (lambda p: (p / "manifest.json").write_text("{\"format\": \"other\"}"),
     "not a distsgd-checkpoint-1 checkpoint"),
    (lambda p: (p / "manifest.json").write_text("{truncated"), "unreadable manifest"),
])
def test_damaged_checkpoints_are_refused_without_changing_anything(tmp_path, damage, match):
    damage(_saved(tmp_path))
    variables, opt = _model(seed=3)
    before = state_digest(variables)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt)
    assert state_digest(variables) == before and opt.weights == []


@pytest.mark.parametrize(("hidden", "match"), [
    (4, r"'var/dense/kernel' has shape \[2, 3\], the model has \[2, 4\]"),
])
def test_checkpoint_of_another_model_is_refused(tmp_path, hidden, match):
    _saved(tmp_path)
    variables, opt = _model(hidden=hidden)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt)


def test_other_dtype_extra_variable_and_world_size_are_refused(tmp_path):
    path = _saved(tmp_path)
    variables, opt = _model()
    variables[1] = distsgd.Variable(np.zeros(3, np.float32), name="dense/bias")
    with pytest.raises(CheckpointError, match="dtype '<f8', the model has '<f4'"):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt)
    variables, opt = _model()
    with pytest.raises(CheckpointError, match="variable 'local', which this model does not"):
        load_checkpoint(tmp_path, variables=variables[:2], optimizer=opt)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["world_size"] = 4
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="written by 4 ranks"):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt)


def test_no_checkpoint_and_duplicate_names(tmp_path):
    variables, opt = _model()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt)
    twins = [distsgd.Variable([1.0], name="x"), distsgd.Variable([2.0], name="x")]
    with pytest.raises(ValueError, match=r"\['x'\] share a name"):
        save_checkpoint(tmp_path, step=0, variables=twins, optimizer=opt)
