"""How is a file written so that a reader sees it whole or not at all? Atomic writes for every artifact.

A writer puts the bytes into a temporary file in the same directory (same filesystem, so the final rename is
atomic), flushes and fsyncs it, then renames it over the target. A crash, a kill or a full disk at any point
leaves either the previous file or the new one, never a half-written one; the temporary file is removed when the
write fails in-process (a SIGKILL can leave one behind: its name starts with ``.tmp-`` so readers skip it, and
:func:`remove_stale_tmp` clears them). A full disk (ENOSPC / EDQUOT) becomes an OSError naming the target path.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

TMP_PREFIX = ".tmp-"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _nearly_full(d: Path) -> bool:
    """Less than 64 KiB (or 0.1%) free on ``d``'s filesystem."""
    try:
        st = os.statvfs(d)
    except OSError:
        return False
    free = st.f_bavail * st.f_frsize
    return free < max(64 << 10, st.f_blocks * st.f_frsize // 1000)


def atomic_write(path, write: Callable, *, binary: bool = True, fsync: bool = True) -> Path:
    """Write ``path`` through ``write(f)`` (f: an open file object) atomically; returns the path.

    On any exception the target is untouched (the previous version stays readable) and the temporary file is
    removed. A full disk is re-raised as OSError(ENOSPC) whose message names ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # some writers (torch.save's zip writer) turn ENOSPC into their own error: look at the disk before the
        # partial temporary file is removed and frees its space again
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or _nearly_full(path.parent)
        try:
            tmp.unlink()
        except OSError:
            pass
        if full and not isinstance(e, KeyboardInterrupt):
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {str(path)!r} (nothing was "
                                        "written there; any previous version is unchanged)") from e  # path once
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes, **kw) -> Path:
    return atomic_write(path, lambda f: f.write(data), **kw)


def atomic_write_text(path, text: str, **kw) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False, **kw)


def atomic_torch_save(obj, path, **kw) -> Path:
    import torch
    return atomic_write(path, lambda f: torch.save(obj, f), **kw)


def remove_stale_tmp(directory) -> list[Path]:
    """Remove temporary files a killed writer left in ``directory``; returns what was removed."""
    removed = []
    for p in Path(directory).glob(f"{TMP_PREFIX}*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
