"""Writing a file so that a kill, a full disk or a second writer never leaves a partial one at its path.

Every results file, record and checkpoint the plugin writes goes through ``replace_atomically``: write a temporary
file in the same folder, fsync it, os.replace it over the path (atomic on POSIX and Windows), then fsync the folder
so the rename itself survives a power cut. A failed write leaves the previous file as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, IO


def _new_file_mode(path: str) -> int:
    if os.path.isfile(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # POSIX only; best effort
        return
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def replace_atomically(path: str, write: Callable[[IO], None], binary: bool = False,
                       rerun: str = "run the command again") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then put it in place of ``path`` in one step.
    The temporary name is unique, so two processes writing the same path never mix their bytes."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes it owner-only; keep what a plain open() would give
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if isinstance(e, Exception):
            raise OSError(f"Could not write {path} ({type(e).__name__}: {e}). The previous {os.path.basename(path)} "
                          f"(if any) is unchanged. Free disk space in {folder} (or fix its permissions) and {rerun}.") from e
        raise
    _fsync_folder(folder)


def write_text_atomically(path: str, text: str) -> None:
    replace_atomically(path, lambda f: f.write(text))


def write_json_atomically(content, path: str, indent: int = 1) -> None:
    """``json.dump(content, indent=indent)`` at ``path``; the bytes equal a plain json.dump's."""
    replace_atomically(path, lambda f: json.dump(content, f, indent=indent))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save that never leaves a partial file at ``path`` (a kill during nnU-Net's own torch.save truncates
    the checkpoint it overwrites)."""
    import torch  # here, so that the JSON writers above import without torch
    replace_atomically(path, lambda f: torch.save(obj, f), binary=True,
                       rerun="run the command again (nnUNetv2_train ... --c resumes a training)")
