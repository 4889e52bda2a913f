"""Every failure of a command is one line on stderr; its traceback is never lost.

``srft <cmd>: error: <what went wrong, naming the file or field>[ (traceback: LOG)]``

- Errors the user can fix (:class:`~megatron_srft.errors.SrftError`: config, data, checkpoint, arguments) exit 2;
  their message is complete, so no log is written (``SRFT_DEBUG=1`` prints the traceback too).
- Environment failures name the file and the cause: disk full, read-only file system, permission denied, a
  missing file, invalid UTF-8, out of memory. Anything else is ``ExcType: first line``. These exit 1 (2 for
  files the user named) and the traceback goes to a log file: ``RUN_DIR/logs/`` for ``srft train`` (once the
  config is read), else a temporary file; the line names it. ``SRFT_DEBUG=1`` prints it on stderr as well.

Under torchrun every rank runs this handler, but only one prints (:func:`claim`): the first rank that fails, with
rank 0 going first for the errors every rank hits identically (a config error raised on all ranks). The others
write their traceback to their own log file and exit with the same code, silently; torchrun then stops the job.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from ..checkpoint.atomic import write_text_atomic
from ..errors import SrftError, first_line

_START = time.time()
#: Ranks other than 0 wait this long before claiming the message, so that an error every rank raises is
#: reported once, by rank 0 (a rank that fails alone is reported this much later).
RANK0_GRACE_S = 1.0


def unwrap(exc: BaseException) -> BaseException:
    """The failure behind a checkpoint library's wrapper: torch's ``CheckpointException`` (a BaseException
    holding each rank's exception in ``failures``) and exceptions raised from another (Megatron's
    ``CheckpointingException``) give their underlying error, an OSError first (disk full, read-only, denied)."""
    for _ in range(8):  # wrappers nest a few levels at most
        failures = getattr(exc, "failures", None)
        inner: list[BaseException] = []
        if isinstance(failures, dict):
            inner = [f[0] for f in failures.values() if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]
        elif "Checkpoint" in type(exc).__name__ and exc.__cause__ is not None:
            inner = [exc.__cause__]
        if not inner:
            return exc
        exc = next((e for e in inner if isinstance(unwrap(e), OSError)), inner[0])
    return exc


def describe(exc: BaseException) -> tuple[str, int, bool]:
    """(one-line message, exit code, whether the traceback is worth a log file) for a failure."""
    exc = unwrap(exc)
    if isinstance(exc, SrftError):  # complete as it is; a wrapped library error keeps its traceback in the log
        return first_line(exc), 2, exc.__cause__ is not None
    if isinstance(exc, UnicodeDecodeError):
        return (f"invalid UTF-8 ({exc.reason} at byte {exc.start}); files must be UTF-8 encoded", 2, True)
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else None
        target = f": {where}" if where is not None else ""
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
            return (f"{what} while writing{target or ' (no file named)'}; free space or write elsewhere (a "
                    f"checkpoint or output written only partly is never taken for a complete one)", 1, True)
        if code == errno.EROFS:
            return f"read-only file system{target}; choose a writable output directory", 2, True
        if code in (errno.EACCES, errno.EPERM):
            return f"permission denied{target}", 2, True
        if code is None:  # raised by our code with a complete message
            return first_line(exc), 2, False
        if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
            return f"{exc.strerror or exc.__class__.__name__}{target}", 2, False
        return f"{exc.strerror or exc.__class__.__name__}{target}", 1, True
    if isinstance(exc, MemoryError):
        return "out of memory", 1, True
    text = first_line(exc, empty="")
    if "No space left on device" in text or "file write failed" in text:  # torch's zip writer: RuntimeError
        return f"disk full while writing ({text})", 1, True
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__, 1, True


def _rank_world() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _job_key() -> str:
    env = os.environ
    return ":".join(env.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                             "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"))


def claim(marker: Path, rank: int) -> bool:
    """True for exactly one failing rank of this job (the first to create ``marker``; rank 0 first)."""
    if rank != 0:
        time.sleep(RANK0_GRACE_S)
    key = _job_key()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            stale = marker.read_text() != key or marker.stat().st_mtime < _START - 600
        except OSError:
            stale = True
        if not stale:
            return False
        write_text_atomic(marker, key)  # a previous job's marker: take it over
        return True
    except OSError:
        return True  # cannot coordinate: better one message per rank than none
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return True


def _write_log(command: str, exc: BaseException, log_dir: Optional[Path], rank: int) -> Optional[Path]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    header = f"srft {command} failed at {time.strftime('%Y-%m-%d %H:%M:%S')} (rank {rank}, pid {os.getpid()})\n"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for d in ([log_dir] if log_dir else []) + [None]:
        try:
            if d is None:
                fd, name = tempfile.mkstemp(prefix=f"srft-{command}-{stamp}-rank{rank}-", suffix=".log")
                with os.fdopen(fd, "w") as f:
                    f.write(header + text)
                return Path(name)
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"error-{stamp}-rank{rank}.log"
            path.write_text(header + text)
            return path
        except OSError:
            continue
    return None


def report(command: str, exc: BaseException, *, run_dir: Optional[str] = None) -> int:
    """Print the one line for ``exc`` (when this rank is the one to report it); returns the exit code."""
    msg, code, want_log = describe(exc)
    rank, world = _rank_world()
    debug = os.environ.get("SRFT_DEBUG", "") not in ("", "0")
    log_dir = Path(run_dir) / "logs" if run_dir else None
    log = _write_log(command, exc, log_dir, rank) if want_log or world > 1 else None
    if world > 1:
        base = log_dir or Path(tempfile.gettempdir()) / "srft-failures"
        name = "".join(c if c.isalnum() else "_" for c in _job_key())[:120] or "job"
        if not claim(base / f".failure-{name}", rank):
            return code
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    where = f" (traceback: {log})" if log is not None and want_log else ""
    if log is None and want_log and not debug:  # no log could be written anywhere: never lose the traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    prefix = f"srft {command}: error: " + (f"[rank {rank}] " if world > 1 and rank != 0 else "")
    print(prefix + msg + where, file=sys.stderr, flush=True)
    return code
