"""Outputs appear whole or not at all: the one home of atomic writes. A directory is built in a temporary sibling
and renamed into place (:func:`atomic_dir`; by several processes: :func:`temp_sibling`, :func:`fresh_dir`,
:func:`replace_dir`); a file is written beside its name and renamed
over it (:func:`write_text_atomic`, :func:`write_files_atomic`).

Outputs never touch inputs: :func:`check_output` (an output that is, lies inside or contains an input is refused)
is the one check every command that writes calls before it writes anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..errors import UserError


def check_output(out: Path, inputs: Iterable[Optional[Path]], flag: str = "--out") -> None:
    """Refuse an output that is, lies inside or contains one of ``inputs`` (symlinks resolved), before anything is
    written or deleted. ``None`` inputs are skipped. One line naming both."""
    real_out = Path(os.path.realpath(out))
    real_ins = [(inp, Path(os.path.realpath(inp))) for inp in inputs if inp is not None]
    for inp, real_in in real_ins:
        if real_out == real_in:
            raise UserError(f"{flag} {out}: is the input {inp}; choose a new path (an input is never replaced)")
    for inp, real_in in real_ins:
        if real_in in real_out.parents:
            raise UserError(f"{flag} {out}: lies inside the input {inp}; choose a path outside it")
        if real_out in real_in.parents:
            raise UserError(f"{flag} {out}: contains the input {inp}; writing there could replace the input")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete ``tmp`` directory to ``final``, replacing an existing one.

    An existing ``final`` is first renamed aside (``.NAME.old``) and only then deleted, so at every moment either
    the old or the new directory is complete under its name (a crash leaves at worst a ``.old`` leftover).
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        _remove(old)
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        tmp.rename(final)


def temp_sibling(final: Path, tag: Optional[str] = None) -> Path:
    """The temporary sibling in which several processes build ``final`` together (a collective save): a name every
    rank computes alike (:func:`atomic_dir`'s is random, for one process), ``.NAME.tmp``, or ``.NAME.tmp-TAG`` so
    that writers with other tags (another run) never share one. Create it with :func:`fresh_dir`, move it into
    place with :func:`replace_dir`."""
    final = Path(final)
    return final.parent / (f".{final.name}.tmp" + (f"-{tag}" if tag else ""))


def fresh_dir(path: Path) -> Path:
    """Create the directory ``path`` anew: whatever is there (a killed writer's leftover, a planted symlink) is
    removed first, a symlink itself and never what it points to, and the directory is then created, not reused
    (``mkdir`` fails rather than follow anything that appears in between)."""
    path = Path(path)
    _remove(path)
    path.mkdir()
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` write the whole output into ``tmp`` (a fresh sibling of ``out``); on a clean
    exit it replaces ``out`` (:func:`replace_dir`), on an exception it is deleted and ``out`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary sibling, flushed to disk, then renamed over it
    (a reader sees the old file or the new one, never a torn one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # *.tmp: never listed in a manifest
    try:
        tmp.unlink(missing_ok=True)  # a leftover, or a planted symlink: removed, never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # write/fsync errors name no file; a full disk's report should name this one
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_files_atomic(out_dir: Path, files: dict[str, str]) -> None:
    """Write each of ``files`` (name -> text) into ``out_dir`` whole (:func:`write_text_atomic`), replacing only
    those names: whatever else the directory holds is left alone, and no directory is ever removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    for name, text in files.items():
        write_text_atomic(out_dir / name, text)


# --------------------------------------------------------------------------------------------- exclusive locks

_HELD_LOCKS: dict[str, int] = {}  # realpath of a lock file -> the open descriptor holding its lock
_UNLOCKABLE: set[str] = set()  # lock files on a file system without locks (warned once)


def lock_holder(path: Path) -> str:
    """Who holds the lock file ``path`` (as :func:`acquire_lock` wrote it), for an error message."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
        who = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
        who += f", run {info['run_id'] or '(starting)'}" if "run_id" in info else ""
        return who + f", since {info.get('since', '?')}"
    except (OSError, ValueError, AttributeError):
        return "holder unknown"


def acquire_lock(path: Path, what: str, **info) -> None:
    """Take (or, in the process holding it, update) an exclusive POSIX lock on the file ``path``; the file holds
    the holder's host, pid, start time and ``info``. Held until :func:`release_lock` or the end of the process:
    the kernel releases it however the process ends (a crash leaves a stale file that the next taker simply takes
    over), and a forked child does not inherit it. Never open the lock file elsewhere in the holding process (closing
    any descriptor of it drops a POSIX lock). Another holder: one line naming it, ``"<what> in use by ..."``."""
    path = Path(path)
    key = os.path.realpath(path)
    fd = _HELD_LOCKS.get(key)
    if key in _UNLOCKABLE:
        return
    while fd is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{path}: is a symlink; refusing to use it as a lock") from None
            raise
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. NFS without a lock daemon
                print(f"[srft] warning: {path}: this file system cannot lock files ({e.strerror}); another "
                      f"process using {what.rstrip(':;')} at the same time would not be detected", flush=True)
                _UNLOCKABLE.add(key)
                return
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise UserError(f"{what} in use by another process ({lock_holder(path)}); wait for it to end") from None
        if not _is_file_at(fd, path):  # its holder removed it (release_lock(remove=True)) after we opened it:
            os.close(fd)  # a lock on the unlinked file excludes no one; take the one at the path now
            fd = None
    _HELD_LOCKS[key] = fd
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)


def _is_file_at(fd: int, path: Path) -> bool:
    """The open file ``fd`` is the one at ``path`` now (not a file unlinked since it was opened)."""
    try:
        st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def release_lock(path: Path, remove: bool = False) -> None:
    """Release the lock this process holds on ``path`` (no-op when none); ``remove`` deletes the file first,
    still locked (a process that opened it meanwhile finds it unlinked after its own lock and retries:
    :func:`acquire_lock`)."""
    fd = _HELD_LOCKS.pop(os.path.realpath(path), None)
    if fd is not None:
        if remove:
            Path(path).unlink(missing_ok=True)
        os.close(fd)


# --------------------------------------------------------------------------------------------- children die with us

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_FORKING_PID: Optional[int] = None
_FORK_HOOK_SET = False


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """In a child process: the kernel kills it (SIGKILL) when its parent ends, however the parent ends (kill -9
    included), so a checkpoint writer never outlives its trainer holding files open. ``parent_pid``: exit at once
    if the parent is already gone. Linux only (elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before the prctl
        os._exit(1)


def _record_forking_pid() -> None:
    global _FORKING_PID
    _FORKING_PID = os.getpid()


def forked_children_die_with_this_process() -> None:
    """From now on every child this process forks (Megatron's checkpoint writers, their helpers) is killed by the
    kernel when this process ends: after a kill -9 of a trainer no writer is left waiting forever. Idempotent."""
    global _FORK_HOOK_SET
    if not _FORK_HOOK_SET and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_record_forking_pid, after_in_child=lambda: die_with_parent(_FORKING_PID))
        _FORK_HOOK_SET = True
