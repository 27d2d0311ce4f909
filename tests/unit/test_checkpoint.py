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


def rewrite_manifest(path, checksum=True, **changes):
    """Edit a checkpoint's manifest; ``checksum``: recompute its checksum (as a genuine
    writer would), else leave the old one (an edit after the fact)."""
    from distsgd.checkpoint.files import _manifest_checksum

    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    if checksum:
        manifest["checksum"] = _manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _saved(tmp_path):
    variables, opt = _model()
    _train(variables, opt, 1)
    return save_checkpoint(tmp_path, step=1, variables=variables, optimizer=opt)


@pytest.mark.parametrize(("damage", "match"), [
    (lambda p: (p / "arrays.npz").write_bytes((p / "arrays.npz").read_bytes()[:100]),
     "arrays.npz is corrupt or truncated"),
    (lambda p: (p / "rank-00000.npz").unlink(), "rank-00000.npz is missing"),
    (lambda p: (p / "manifest.json").write_text("{\"format\": \"other\"}"),
     "not a distsgd-checkpoint-2 checkpoint"),
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
    with pytest.raises(CheckpointError, match="holds 'var/local', which this model does not"):
        load_checkpoint(tmp_path, variables=variables[:2], optimizer=opt)
    rewrite_manifest(path, world_size=4)  # as if 4 ranks had written it
    with pytest.raises(CheckpointError, match="written by 4 ranks"):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt)


def test_no_checkpoint_and_duplicate_names(tmp_path):
    variables, opt = _model()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt)
    twins = [distsgd.Variable([1.0], name="x"), distsgd.Variable([2.0], name="x")]
    with pytest.raises(ValueError, match=r"\['x'\] share a name"):
        save_checkpoint(tmp_path, step=0, variables=twins, optimizer=opt)


def _refused_untouched(tmp_path, match, **kwargs):
    variables, opt = _model(seed=3)
    before = state_digest(variables)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path, variables=variables, optimizer=opt, **kwargs)
    assert state_digest(variables) == before and opt.weights == []


@pytest.mark.parametrize("edit", [{"step": 7}, {"state": {"global_step": 9}},
                                  {"optimizer": {"class_name": "SGD", "config": {
                                      "name": "SGD", "learning_rate": 5.0, "decay": 0.0,
                                      "momentum": 0.9, "nesterov": True}}}])
def test_an_edited_manifest_is_refused(tmp_path, edit):
    rewrite_manifest(_saved(tmp_path), checksum=False, **edit)
    _refused_untouched(tmp_path, "manifest.json was changed after it was written")


def test_an_extra_slot_is_refused(tmp_path):
    path = _saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    extra = dict(manifest["entries"][-1], key="slot/dense/kernel/velocity")
    rewrite_manifest(path, checksum=False, entries=[*manifest["entries"], extra])
    _refused_untouched(tmp_path, "manifest.json was changed")
    rewrite_manifest(path, entries=[*manifest["entries"], extra])  # even when consistent
    _refused_untouched(tmp_path, "velocity")


def test_float64_arrays_with_a_matching_checksum_are_refused(tmp_path):
    """A consistent checkpoint of another dtype: the arrays are checked against the
    manifest and the model before anything is assigned."""
    variables, opt = _model()
    variables = [distsgd.Variable(v.numpy().astype(np.float32), name=v.name,
                                  synchronization=v.synchronization) for v in variables]
    opt.apply_gradients([(np.ones(v.shape, np.float32), v) for v in variables])
    save_checkpoint(tmp_path, step=1, variables=variables, optimizer=opt)  # float32
    _refused_untouched(tmp_path, "dtype '<f4', the model has '<f8'")


@pytest.mark.parametrize(("change", "match"), [
    (lambda m: m.pop("entries"), "manifest has no 'entries'"),
    (lambda m: m.update(step="3"), "field 'step' is str, expected int"),
    (lambda m: m["entries"][0].update(shape="big"), "field 'shape' is str"),
    (lambda m: m["entries"][0].pop("dtype"), "has no 'dtype'"),
    (lambda m: m["entries"].append(7), r"entry #\d+ is not an object"),
    (lambda m: m.update(optimizer={"config": {}}), "no class_name/config"),
])
def test_a_malformed_manifest_is_refused_before_anything_is_assigned(tmp_path, change, match):
    from distsgd.checkpoint.files import _manifest_checksum

    path = _saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    manifest["checksum"] = _manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    _refused_untouched(tmp_path, match)


def test_an_array_claiming_2_gib_is_refused_without_allocating_it(tmp_path):
    """The member's .npy header claims 2 GiB; the manifest (checksums made to match)
    and the model say 2 x 3: refused, with far less than 2 GiB ever allocated."""
    import hashlib
    import tracemalloc
    import zipfile

    path = _saved(tmp_path)
    header = {"descr": "<f8", "fortran_order": False, "shape": (1 << 28,)}
    npy = np.lib.format.magic(1, 0) + _npy_header(header)
    with zipfile.ZipFile(path / "arrays.npz", "a") as archive:
        names = archive.namelist()
    with zipfile.ZipFile(path / "big.npz", "w") as archive:
        with zipfile.ZipFile(path / "arrays.npz") as source:
            for name in names:
                data = npy + b"\0" * 64 if name == "var/dense/kernel.npy" else source.read(name)
                archive.writestr(name, data)
    (path / "big.npz").replace(path / "arrays.npz")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"]["arrays.npz"] = hashlib.sha256(
        (path / "arrays.npz").read_bytes()).hexdigest()
    rewrite_manifest(path, sha256=manifest["sha256"])
    tracemalloc.start()
    try:
        _refused_untouched(tmp_path, r"holds shape \(268435456,\) float64")
        _, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, (peak, snapshot.statistics("lineno")[:5])


def _npy_header(header: dict) -> bytes:
    text = repr(header).encode() + b" "
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return len(text).to_bytes(2, "little") + text


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "symlink elsewhere"])
def test_non_regular_files_are_refused_without_opening_them(tmp_path, kind):
    import os

    path = _saved(tmp_path)
    target = path / "arrays.npz"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink to /dev/zero":
        target.symlink_to("/dev/zero")
    else:
        (tmp_path / "outside.npz").write_bytes(b"x")
        target.symlink_to(tmp_path / "outside.npz")
    _refused_untouched(tmp_path, "not a regular file")


@pytest.mark.parametrize("pointer", ["../elsewhere", "/tmp", "ckpt-0000000001/../.."])
def test_latest_is_only_followed_inside_the_directory(tmp_path, pointer):
    _saved(tmp_path / "ckpt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "ckpt" / "latest").write_text(pointer + "\n")
    assert latest_checkpoint(tmp_path / "ckpt").name == "ckpt-0000000001"
    assert latest_checkpoint(tmp_path / "ckpt").parent == tmp_path / "ckpt"


def test_a_symlinked_checkpoint_is_not_followed(tmp_path):
    other = tmp_path / "other"
    _saved(other)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ckpt-0000000009").symlink_to(other / "ckpt-0000000001")
    (tmp_path / "ckpt" / "latest").write_text("ckpt-0000000009\n")
    assert latest_checkpoint(tmp_path / "ckpt") is None
    _refused_untouched(tmp_path / "ckpt", "no complete checkpoint")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path):
    from distsgd.checkpoint import CheckpointWarning

    variables, opt = _model()
    for step in (1, 2, 3):
        _train(variables, opt, 1)
        save_checkpoint(tmp_path, step=step, variables=variables, optimizer=opt)
    newest = tmp_path / "ckpt-0000000003"
    (newest / "arrays.npz").write_bytes(b"garbage")
    fresh_vars, fresh_opt = _model(seed=4)
    with pytest.warns(CheckpointWarning, match=r"ckpt-0000000003 is unusable .*corrupt.*"
                                               r"loaded ckpt-0000000002 instead"):
        load_checkpoint(tmp_path, variables=fresh_vars, optimizer=fresh_opt)
    assert int(fresh_opt.iterations.numpy()) == 2
    # naming one loads exactly that one, or fails
    chosen_vars, chosen_opt = _model(seed=4)
    load_checkpoint(tmp_path, variables=chosen_vars, optimizer=chosen_opt,
                    path=tmp_path / "ckpt-0000000001")
    assert int(chosen_opt.iterations.numpy()) == 1
    _refused_untouched(tmp_path, "corrupt", path=newest)


def test_a_directory_in_use_by_another_job_is_refused_at_once(tmp_path):
    import subprocess
    import sys

    from distsgd.checkpoint import prepare_checkpoint_directory

    prepare_checkpoint_directory(tmp_path)  # this process holds the lock
    program = ("import sys; from distsgd.checkpoint import prepare_checkpoint_directory; "
               "prepare_checkpoint_directory(sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"checkpoint directory {tmp_path} is in use by pid" in result.stderr
    assert "give this job a directory of its own" in result.stderr


def test_an_unwritable_directory_is_refused_before_training(tmp_path):
    import os

    from distsgd.checkpoint import prepare_checkpoint_directory

    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: make a file the parent
            locked.chmod(0o700)
            (tmp_path / "file").write_text("")
            locked = tmp_path / "file" / "sub"
        with pytest.raises(CheckpointError, match="is not writable"):
            prepare_checkpoint_directory(locked)
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_a_failed_write_leaves_no_debris_and_later_saves_remove_old_debris(tmp_path,
                                                                          monkeypatch):
    import errno

    from distsgd.checkpoint import save as checkpoint

    variables, opt = _model()
    save_checkpoint(tmp_path, step=1, variables=variables, optimizer=opt)

    def full_disk(path, arrays):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_synced", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(tmp_path, step=2, variables=variables, optimizer=opt)
    assert not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    # debris of a job killed mid-commit or while deleting an old checkpoint
    (tmp_path / ".tmp-ckpt-0000000005-0badf00d").mkdir()
    (tmp_path / "ckpt-0000000004").mkdir()  # no manifest: half deleted
    save_checkpoint(tmp_path, step=6, variables=variables, optimizer=opt)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock")) == \
        ["ckpt-0000000001", "ckpt-0000000006", "latest"]
