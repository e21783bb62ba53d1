"""Files that survive a crash, files that are safe to read, and output paths checked before any work.

Writing (nothing is ever half-written):

- :func:`atomic_write` and its wrappers write a temporary file in the target's folder, flush it to disk
  (``fsync``), rename it over the target and ``fsync`` the folder: a reader, or a process killed at any moment
  (SIGKILL included), sees the previous file or the new one, never a torn one.
- :func:`staged_dir` collects a whole result folder in a temporary sibling folder and moves it into place when
  everything is written, so a failure leaves the previous result or none, never a mix of both.

Reading (never pickle): :func:`load_safetensors` and :func:`read_json` turn a missing, truncated or corrupt file
into one clear error naming the file (:class:`FileFormatError`), and safetensors and JSON cannot run code.

Checking outputs before the work starts: :func:`check_out_dir` and :func:`check_out_file` refuse an output that
is an existing file, collides with an input, holds results of another kind, or holds a result of the same kind
that the caller did not ask to replace (``overwrite``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


class FileFormatError(ValueError):
    """A file exists but cannot be used: truncated, corrupt, or not the kind of file expected."""


class OutputError(ValueError):
    """An output path cannot be used: an existing file, an input, or a folder holding something else."""


class OutputExistsError(OutputError, FileExistsError):
    """The output already holds a result of the same kind and ``overwrite`` was not given."""


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------

def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


_LEFTOVER = re.compile(r"^\..+\.([a-z0-9_]{8}\.tmp(\.[^.]*)?|(tmp|old)-[a-z0-9_]{8})$")


def is_leftover(name: str) -> bool:
    """True for the name of a temporary file or folder this module creates (``.<name>.<random>.tmp<suffix>``,
    ``.<name>.tmp-<random>``, ``.<name>.old-<random>``): left behind only by a killed process, never a result."""
    return bool(_LEFTOVER.match(name))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, which is
    fsync'ed and renamed over ``path``; the folder is fsync'ed too. On any failure (KeyboardInterrupt included)
    the temporary file is removed and ``path`` is untouched. Returns ``path``."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the suffix: writers such as matplotlib choose the format by it
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results get the usual permissions
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON plus a newline, written atomically."""
    return atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def save_safetensors(path: str | Path, tensors: dict, metadata: Optional[dict[str, str]] = None) -> Path:
    """``safetensors.torch.save_file`` written atomically (tensors are made contiguous CPU copies)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Build a result folder out of sight and move it into place at the end.

    Yields a new, empty temporary folder beside ``final`` (``.<name>.tmp-<random>``); write everything there.
    When the block ends without an error, every file in it is fsync'ed, an existing ``final`` is moved aside,
    the temporary folder is renamed to ``final`` and the previous folder is deleted (with whatever it held, such
    as a finished job's checkpoint). On any error (KeyboardInterrupt included) the temporary folder is removed
    and ``final`` is untouched. Whether ``final`` may be replaced is the caller's decision, taken before the work
    (:func:`check_out_dir`).
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{final.name}.tmp-*"):  # a killed earlier attempt's staging folder
        logger.info("removing %s, left by an interrupted earlier run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` (a sibling), replacing what was there (see :func:`staged_dir`)."""
    tmp, final = Path(tmp), Path(final)
    for root, _dirs, names in os.walk(tmp):
        for name in names:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                _fsync_file(p)
        fsync_dir(root)
    old = None
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, old / final.name)  # rename: the old result stays whole until the new one is in place
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------------------

def _missing(path: Path, what: str, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} {path} does not exist" + (f"; {hint}" if hint else ""))


def load_safetensors(path: str | Path, *, what: str = "file", hint: str = "", keys: Optional[Iterable[str]] = None
                     ) -> tuple[dict, dict[str, str]]:
    """Read a safetensors file: ``(tensors on the CPU, metadata)``. Never unpickles anything.

    ``keys``: read only these tensors (default all). A missing file raises FileNotFoundError, a truncated or
    corrupt one (or a pickle, or any other file) :class:`FileFormatError`, both naming ``what`` and the path and
    ending with ``hint`` (what to do).
    """
    def read(f):
        names = list(f.keys()) if keys is None else [k for k in keys if k in set(f.keys())]
        return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})

    return _read_safetensors(path, what, hint, read)


def _existing_file(path: str | Path, what: str, hint: str) -> Path:
    """``path`` as a Path; a missing file or a folder raises the one-line error naming it."""
    path = Path(path)
    if not path.exists():
        raise _missing(path, what, hint)
    if path.is_dir():
        raise FileFormatError(f"{what} {path} is a folder, not a file" + (f"; {hint}" if hint else ""))
    return path


def _read_safetensors(path: str | Path, what: str, hint: str, read):
    """``read(handle)`` of an opened safetensors file; a missing, folder, truncated or corrupt file (or a pickle)
    becomes the one-line errors of :func:`load_safetensors`."""
    from safetensors import safe_open

    path = _existing_file(path, what, hint)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return read(f)
    except Exception as err:  # SafetensorError (its own type), OSError, ...
        reason = " ".join(str(err).split()) or type(err).__name__
        raise FileFormatError(f"{what} {path} is not a readable safetensors file ({reason}): it is truncated, "
                              f"corrupt or of another kind" + (f"; {hint}" if hint else "")) from err


def safetensors_header(path: str | Path, *, what: str = "file", hint: str = "") -> tuple[dict[str, str], dict]:
    """``(metadata, {key: shape})`` of a safetensors file, reading no tensor data. The whole header is validated
    (a truncated file is caught here), with the errors of :func:`load_safetensors`."""
    return _read_safetensors(path, what, hint, lambda f: (
        dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}))


def read_json(path: str | Path, *, what: str = "file", hint: str = "") -> Any:
    """Parse a JSON file; a missing, unreadable, truncated or malformed one raises an error naming the file."""
    path = _existing_file(path, what, hint)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})"
                              + (f"; {hint}" if hint else "")) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = "ends early (truncated?)" if err.pos >= len(text.rstrip()) else f"line {err.lineno}: {err.msg}"
        raise FileFormatError(f"{what} {path} is not valid JSON ({where})" + (f"; {hint}" if hint else "")) from None


# --------------------------------------------------------------------------------------------------------------
# Output checks (run before any work)
# --------------------------------------------------------------------------------------------------------------

#: The result folders the commands write, by the file that marks each (first match wins).
RESULT_MARKERS: tuple[tuple[str, str], ...] = (
    ("pruned", "prune.json"),
    ("run", "run.json"),
    ("scores", "stats.safetensors"),
    ("scores", "summary.json"),
)
KIND_NAMES = {
    "pruned": "a pruned model (prune.json, written by `skillkern prune`)",
    "run": "a tuned run (run.json, written by `skillkern tune`)",
    "scores": "a score result (stats.safetensors, written by `skillkern score`)",
}


def folder_kind(folder: str | Path) -> Optional[str]:
    """The kind of result a folder holds (a key of :data:`KIND_NAMES`), or None."""
    folder = Path(folder)
    for kind, marker in RESULT_MARKERS:
        if (folder / marker).exists():
            return kind
    return None


def resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def is_within(inner: str | Path, outer: str | Path) -> bool:
    """True when ``inner`` is ``outer`` or lies inside it (after resolving links)."""
    a, b = resolved(inner), resolved(outer)
    return a == b or b in a.parents


def _check_parent(out: Path, flag: str) -> None:
    """Refuse an output whose nearest existing ancestor is a file or is not writable."""
    p = resolved(out).parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"{flag} {out}: {p} is a file, not a folder; choose another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: cannot write in {p} (permission denied); choose another path")


def _check_inputs(out: Path, flag: str, inputs: Sequence[tuple[str, Optional[str | Path]]]) -> None:
    for name, path in inputs:
        if path is None or not Path(path).exists():
            continue
        if resolved(out) == resolved(path):
            raise OutputError(f"{flag} {out} is the {name} {path}, an input of this command; choose another "
                              f"{'folder' if Path(path).is_dir() else 'path'}")
        if Path(path).is_dir() and is_within(path, out):
            raise OutputError(f"{flag} {out} contains the {name} {path}, an input of this command, which writing "
                              "the result there could destroy; choose another folder")


def check_out_dir(out: str | Path, *, kind: str, flag: str = "--out", overwrite: bool = False,
                  partial: Sequence[str] = (), inputs: Sequence[tuple[str, Optional[str | Path]]] = ()) -> str:
    """Decide, before any work, whether the result folder ``out`` (of kind ``kind``) may be written.

    Args:
        kind: what the command writes, a key of :data:`KIND_NAMES`.
        flag: the option that named ``out`` (for messages).
        overwrite: replace an existing result of the same kind.
        partial: file name patterns (fnmatch) that an unfinished, resumable job of this kind leaves in ``out``
            (checkpoints); a folder holding only those is not a result.
        inputs: ``(name, path)`` of the command's inputs; ``out`` may be neither one of them nor contain one.

    Returns:
        ``"new"`` (missing or empty), ``"partial"`` (only a resumable job's files) or ``"replace"`` (a result of
        this kind, ``overwrite`` given).

    Raises:
        OutputError: ``out`` is a file, an input or contains one, or holds other files or results of another
            kind (refused even with ``overwrite``: the whole folder would be replaced).
        OutputExistsError: ``out`` holds a result of this kind and ``overwrite`` is False.
    """
    out = Path(out)
    _check_inputs(out, flag, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is an existing file, not a folder; give a folder path")
    _check_parent(out, flag)
    if not out.exists():
        return "new"
    entries = sorted(e.name for e in out.iterdir() if not is_leftover(e.name))
    if not entries:
        return "new"
    found = folder_kind(out)
    if found is None:
        if all(any(fnmatch.fnmatch(name, pat) for pat in partial) for name in entries):
            return "partial"
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(f"{flag} {out} is a folder holding other files ({shown}), and the result replaces the "
                          "whole folder; choose a new or empty folder")
    if found != kind:
        raise OutputError(f"{flag} {out} holds {KIND_NAMES[found]}, not {KIND_NAMES[kind].split(' (')[0]}; "
                          "choose another folder")
    if not overwrite:
        raise OutputExistsError(f"{flag} {out} already holds {KIND_NAMES[kind].split(' (')[0]}; pass --overwrite "
                                "to replace it (the whole folder), or choose another folder")
    return "replace"


def check_out_file(out: str | Path, *, flag: str = "--out", suffix: str = ".json", overwrite: bool = False,
                   ours: Optional[Callable[[Path], bool]] = None, what: str = "result",
                   inputs: Sequence[tuple[str, Optional[str | Path]]] = ()) -> str:
    """Decide, before any work, whether the result file ``out`` may be written.

    Args:
        suffix: the file name must end with it.
        ours: tells whether an existing file is a result of this kind (only those may be replaced).
        what: what the file holds (for messages).

    Returns:
        ``"new"`` or ``"replace"`` (an existing result of this kind, ``overwrite`` given).
    """
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a folder; give a file path ending in {suffix}")
    _check_inputs(out, flag, inputs)
    if out.suffix != suffix:
        raise OutputError(f"{flag} {out} must end in {suffix}")
    _check_parent(out, flag)
    if not out.exists():
        return "new"
    if ours is not None and not ours(out):
        raise OutputError(f"{flag} {out} is an existing file that is not a {what}; choose another path")
    if not overwrite:
        raise OutputExistsError(f"{flag} {out} already holds a {what}; pass --overwrite to replace it, or choose "
                                "another path")
    return "replace"
