"""Stopping a run on purpose, and what says so: the exit statuses, the stop signals
(SIGTERM, SIGINT, SIGUSR1: finish the step, checkpoint, exit; a second one: at once) and the
output folder's lock. Standard library only, so that ``cli`` installs the handlers before it
imports torch: a signal during start-up stops the run too (one inside an import, when start-up
ends).

:class:`training.Run` does the rest: it checks for a stop after every optimiser step
(``Run.after_step``) and ends the run after the checkpoint it then writes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shlex
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


# Exit statuses besides 0, 1 (an OS error: a full disk, no permission) and 2 (bad input);
# README "Outputs". A second stop signal ends the process at once, by the signal itself.
PREEMPTED = 75  # a stop signal, after a checkpoint: --resume continues (sysexits' EX_TEMPFAIL, "try again")
DIVERGED = 3  # --max-bad-steps optimiser steps in a row with a non-finite loss or gradient norm
FOLDER_IN_USE = 4  # another running process holds --output
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunStopped(BaseException):
    """A run that stops on purpose: ``cli.main`` prints its message in one line and exits with
    ``status``. A BaseException, as KeyboardInterrupt, because a signal handler may raise it
    inside library code, whose ``except Exception`` must not swallow it."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


COMMAND_LINE: list[str] | None = None  # this process's command, set by cli, for the --resume command a stop prints


def resume_command() -> str:
    if COMMAND_LINE is None:
        return "the same config with resume=True"
    args, skip = [], False
    for a in COMMAND_LINE:
        if skip and a.lower() in ("true", "false", "yes", "no", "1", "0"):  # --resume true
            continue
        skip = a.split("=")[0] in ("--resume", "--overwrite")
        if not skip:
            args.append(a)
    launcher = "accelerate launch <as before> " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return launcher + shlex.join(args + ["--resume"])


_received: int | None = None  # the first stop signal this process received
_deferred = False  # it came during an import, with nothing to save: the run stops at its next safe point
_run = None  # the training.Run the handlers serve, once it exists
_previous_handlers: dict = {}


def signal_received() -> int | None:
    return _received


def _nothing_to_save(signum: int, run) -> RunStopped:
    since = f"since {run.last_checkpoint}" if run is not None and run.last_checkpoint else "yet"
    return RunStopped(f"{signal.Signals(signum).name}: stopped, with no optimiser step to save {since}; "
                      f"continue with: {resume_command()}", PREEMPTED)


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_stop_signal(signum, frame) -> None:
    global _received, _deferred
    for s in STOP_SIGNALS:  # a second signal stops at once, by the kernel's default action; finished
        signal.signal(s, signal.SIG_DFL)  # checkpoints stay whole (each is written to a .tmp dir, then renamed)
    _received = signum
    name = signal.Signals(signum).name
    if _run is not None and _run.unsaved_steps:
        log.warning("%s: finishing the optimiser step, then saving a checkpoint (a second signal stops at once)", name)
        return
    if _in_import(frame):
        # An exception raised inside an import can unwind into a C extension's module
        # initialisation (torch's), which aborts the process (SIGABRT) instead of passing it on.
        # So the run stops at its next safe point: the end of start-up (install_stop_handlers
        # with the run), or, during the run, after its next step (Run.stop_requested).
        _deferred = _run is None
        log.warning("%s: stopping %s (a second signal stops at once)", name,
                    "when start-up ends" if _deferred else "after the next optimiser step")
        return
    # nothing trained since the last checkpoint (start-up, sampling, writing final/): stop now
    raise _nothing_to_save(signum, _run)


def install_stop_handlers(run=None) -> None:
    """SIGTERM, SIGINT and SIGUSR1 stop the run: at once while it has nothing to save, else
    after its optimiser step and a checkpoint (``run``, a :class:`training.Run`, counts the
    steps it has not saved). A signal held since start-up's imports stops the run here, as
    ``run`` arrives. Only the main thread can install handlers; from another thread (an API
    caller's) the signals keep their actions."""
    global _run, _received, _deferred
    if threading.current_thread() is not threading.main_thread():
        return
    if _deferred and run is not None:  # a signal during start-up's imports: start-up ends here, before any step
        _deferred = False
        raise _nothing_to_save(_received, run)
    _run, _received = run, None
    for s in STOP_SIGNALS:
        _previous_handlers.setdefault(s, signal.getsignal(s))
        signal.signal(s, _on_stop_signal)


def uninstall_stop_handlers() -> None:
    global _run, _deferred
    if threading.current_thread() is not threading.main_thread():
        return
    _run, _deferred = None, False
    for s, handler in _previous_handlers.items():
        signal.signal(s, handler)
    _previous_handlers.clear()


# ------------------------------------------------------------------ the run's folder lock

LOCK = ".lock"
_locks: dict[str, int] = {}  # output folder -> the descriptor of the lock this process holds


def lock_output(output: Path) -> None:
    """An exclusive ``flock`` on ``OUTPUT/.lock`` for the run's life, holding the pid: a second
    run into the folder stops at once, naming the first. The kernel releases the lock when
    the holder dies however it dies, so a stale file never blocks ``--resume``. A process
    holds one lock per folder (a second in-process run on it, e.g. a resume, keeps it)."""
    key = os.path.realpath(output)
    if key in _locks:
        return
    output.mkdir(parents=True, exist_ok=True)
    fd = os.open(output / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        holder = _lock_holder(fd)
        os.close(fd)
        raise RunStopped(f"{output} is in use by another run (pid {holder}): wait for it to end, or use another "
                         "--output", FOLDER_IN_USE) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks[key] = fd


def _lock_holder(fd: int) -> str:
    """The pid in the lock file, once the holder has written its own (it does just after it
    locks; until then the file is empty or names the last, dead, holder)."""
    for _ in range(100):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            try:
                os.kill(int(text), 0)
                return text
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, another user's
                return text
        time.sleep(0.01)
    return "unknown"


def unlock_output(output: Path) -> None:
    fd = _locks.pop(os.path.realpath(output), None)
    if fd is not None:
        os.close(fd)


def release(output) -> None:
    """What a run holds while it trains: the signal handlers and the folder's lock."""
    uninstall_stop_handlers()
    if output is not None:
        unlock_output(Path(output))
