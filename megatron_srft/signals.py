"""Pre-emption signals: which ones stop a training run, the exit status of a stopped run, and how child processes
are started so that they survive those signals.

torchrun (``--signals-to-handle``) forwards a signal with ``os.killpg`` to each worker's process group, so every
child of a trainer receives it as well: the reward pool's verifier workers and the manager process behind
Megatron's checkpoint write-results queue. Python's handlers do not survive exec, but ``SIG_IGN`` does; a child
started inside :func:`children_ignore_stop_signals` ignores the stop signals for its whole life, and the trainer
alone decides what a stop means (save, then exit with :data:`STOPPED_EXIT_CODE`).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

#: The signals after which the trainer checkpoints and exits (checkpoint.save_on_signal). SIGUSR1 is what
#: ``#SBATCH --signal`` sends; SIGTERM is what schedulers and ``kill`` send.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

#: Exit status of a run stopped by a stop signal after its checkpoint (75 = EX_TEMPFAIL in sysexits.h:
#: "temporary failure, try again"). Not 0: the model is unfinished, so ``srft train && srft convert ...`` stops.
STOPPED_EXIT_CODE = 75

#: Set by ``srft launch`` for its trainers: the file in which local rank 0 leaves the stop line for the launcher,
#: which prints it as its own last line (torchrun's exit says only which signal it forwarded).
STOP_FILE_ENV = "SRFT_STOP_FILE"


class RunStopped(Exception):
    """A stop signal ended the run after ``step`` (the checkpoint at ``checkpoint``, or None before any step)."""

    def __init__(self, step: int, signal_name: str, checkpoint: Optional[Path]) -> None:
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        where = (f"checkpoint at {checkpoint} (a requeue resumes from it)" if checkpoint is not None
                 else "no checkpoint yet (a requeue starts from the beginning)")
        super().__init__(f"stopped at step {step} by {signal_name}; {where}")


@contextmanager
def children_ignore_stop_signals() -> Iterator[None]:
    """Start child processes inside this block: they ignore :data:`STOP_SIGNALS` for their whole life.

    The stop signals are ``SIG_IGN`` in this process for the duration of the block (a fork copies the
    disposition and exec keeps ``SIG_IGN``), then the previous handlers come back. A stop signal that reaches
    this process inside the block is lost, so keep the block to the start of the process itself. Outside the
    main thread handlers cannot be changed; the block then does nothing (the trainer has no handlers there
    either).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
