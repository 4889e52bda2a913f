"""The one home of atomic writes: an output appears whole or not at all, and a failure leaves the old one."""

from __future__ import annotations

import pytest

from megatron_srft.checkpoint.atomic import atomic_dir, write_bytes_atomic, write_text_atomic


def test_atomic_dir_replaces_on_success_and_keeps_the_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("two, half written")
            raise RuntimeError("disk full")
    assert (out / "a.txt").read_text() == "one"
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or .old leftovers


def test_atomic_dir_replaces_a_file_of_the_same_name(tmp_path):
    out = tmp_path / "results"
    out.write_text("an older run wrote a file here")
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text("{}")
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_write_text_atomic_is_whole_or_nothing(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_text_atomic(path, '{"step": 1}')
    assert path.read_text() == '{"step": 1}'
    with pytest.raises(TypeError):
        write_bytes_atomic(path, None)  # fails inside the write: the old file stays, no temporary is left
    assert path.read_text() == '{"step": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_temporary_paths_are_created_fresh_never_followed(tmp_path):
    import os

    from megatron_srft.checkpoint.atomic import fresh_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / f".state.json.{os.getpid()}.tmp").symlink_to(outside / "precious.txt")  # planted at the temp name
    write_text_atomic(out / "state.json", "{}")
    assert (out / "state.json").read_text() == "{}" and (outside / "precious.txt").read_text() == "keep"
    (out / "step.tmp").symlink_to(outside)
    fresh_dir(out / "step.tmp")
    assert (out / "step.tmp").is_dir() and not (out / "step.tmp").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    from megatron_srft.checkpoint.atomic import acquire_lock, release_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    acquire_lock(tmp_path / ".lock", f"{tmp_path}:")
    acquire_lock(tmp_path / ".lock", f"{tmp_path}:")  # warned once
    assert capsys.readouterr().out.count("cannot lock files (No locks available)") == 1
    release_lock(tmp_path / ".lock")


def test_a_lock_taken_on_a_file_its_holder_removed_is_retaken_on_the_current_file(tmp_path):
    """release_lock(remove=True) unlinks the lock file; a process that opened it just before locks a file no one
    else can see. acquire_lock checks that the locked file is the one at the path, else takes the new one."""
    import os

    from megatron_srft.checkpoint.atomic import _is_file_at, acquire_lock, lock_holder, release_lock

    path = tmp_path / ".out.lock"
    path.write_text("{}")
    fd = os.open(path, os.O_RDWR)  # opened before the holder removes the file
    try:
        assert _is_file_at(fd, path)
        path.unlink()
        assert not _is_file_at(fd, path)
        path.write_text("{}")  # a successor at the same path
        assert not _is_file_at(fd, path)
    finally:
        os.close(fd)
    acquire_lock(path, "--out x:")
    assert "pid" in lock_holder(path) or str(os.getpid()) in lock_holder(path)
    release_lock(path, remove=True)
    assert not path.exists()
