"""Crash-safe files: everything finished is either fully on disk or not at all.

Writes that fail (a full disk, a read-only file system, no permission) raise ``OSError``
naming the path, and leave no half-written final file: the temporary file or directory
is removed and the previous version of the target stays as it was. ``cli.main`` reports
such errors in one line with :func:`os_error_message` / :func:`write_error_message`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path

# Locals that name the file being written in the frames of torch.save, safetensors'
# save_file, accelerate's save, transformers' save_pretrained and pathlib's write_text.
_PATH_LOCALS = ("filename", "f", "name_or_buffer", "file", "path", "save_directory", "self")
# torch.save's zip writer on a failed write ("unexpected pos A vs B" when a write came
# up short, "file write failed" when the stream failed); it does not say why.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed writing", "unexpected pos", "file write failed")
# the free space under which a failed write is taken to be a full disk
_FULL = 1 << 20


def _as_path(value, name: str) -> str | None:
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
    elif isinstance(value, str) and name != "self":
        path = value
    elif isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
        path = value.name  # an open file
    else:
        return None
    if not isinstance(path, str) or os.sep not in path:
        return None
    return path if os.path.isabs(path) or os.path.isdir(os.path.dirname(path)) else None


def path_in_traceback(exc: BaseException) -> str | None:
    """The file a failed write was writing, from the innermost frame that names one."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        local = frame.f_locals
        for name in _PATH_LOCALS:
            path = _as_path(local[name], name) if name in local else None
            if path:
                return path
    return None


def _free_bytes(path: str) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_error_message(exc: BaseException) -> str | None:
    """``"PATH: No space left on device"`` for a write that torch.save or safetensors
    failed (they raise RuntimeError / SafetensorError, not OSError, without the path);
    None for any other exception. safetensors says "No space left on device (os error 28)";
    torch.save says only that the write came up short, so a full disk is recognised by the
    file system having (almost) no free space left."""
    text = str(exc)
    path = path_in_traceback(exc)
    if "No space left on device" in text or "os error 28" in text:
        reason = os.strerror(errno.ENOSPC)
    elif isinstance(exc, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURES):
        free = _free_bytes(path) if path else None
        reason = os.strerror(errno.ENOSPC) if free is not None and free < _FULL else \
            f"write failed ({' '.join(text.split())[:120]})"
    else:
        return None
    return f"{path}: {reason}" if path else reason


def os_error_message(exc: OSError) -> str:
    """``"PATH: reason"`` for an OSError; the path comes from the error or, for errors
    raised by a write on an open file (which carry none), from the traceback."""
    path = exc.filename if exc.filename is not None else path_in_traceback(exc)
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    if exc.filename2 is not None:
        reason += f" (-> {exc.filename2})"
    if path is None:
        return reason
    return f"{os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else path}: {reason}"


def _as_os_error(exc: BaseException, tmp: Path, final: Path) -> BaseException:
    """An OSError naming the file under ``final`` whose write into ``tmp`` failed (errors of
    writes on open files name none); torch's / safetensors' failed writes on a full disk
    become OSError(ENOSPC). Call before removing ``tmp`` (the free space tells)."""
    if isinstance(exc, OSError):
        failed = exc.filename if exc.filename is not None else path_in_traceback(exc)
    elif isinstance(exc, Exception) and (write_error_message(exc) or "").endswith(os.strerror(errno.ENOSPC)):
        failed = path_in_traceback(exc)
        exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        return exc
    failed, tmp = os.fsdecode(failed or tmp), str(tmp)
    if failed == tmp or failed.startswith(tmp + os.sep):  # name the final path, not the removed temporary one
        failed = str(final) + failed[len(tmp):]
    exc.filename = failed
    if exc.filename2 is not None and os.fsdecode(exc.filename2) == str(final):
        exc.filename2 = None  # os.replace(tmp, final): the error is about final alone
    return exc


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        err = _as_os_error(e, tmp, path)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err is e:
            raise
        raise err from e


def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary directory that replaces ``path`` only once the block finished.
    If the block fails, the temporary directory is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        err = _as_os_error(e, tmp, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if err is e:
            raise
        raise err from e
    old = path.with_name(f".{path.name}.old")
    try:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


class MetricsLog:
    """Append-only ``metrics.jsonl``; one flushed line per record, so a kill loses at most
    the line being written. On resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= step:
                keep.append(line + "\n")
        atomic_write_text(self.path, "".join(keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError as e:  # e.g. a full disk: drop the part of the line that was written
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                if e.filename is None:
                    e.filename = str(self.path)
                raise
        finally:
            os.close(fd)
