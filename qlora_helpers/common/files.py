"""Where results go, and writing them so that nothing is ever half-written.

A notebook ends with ``save_results("01_memory_math", {...})``. Under the notebook runner
(``python -m qlora_helpers run``) the file lands in that notebook's run folder (the runner sets
``QLORA_RESULTS_DIR``); opened by hand in JupyterLab it lands in ``runs/interactive/``.
GPU measurements live in ``benchmarks/results/<name>.json`` and are read with ``load_benchmark``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from qlora_helpers.common.results import value

RESULTS_ENV = "QLORA_RESULTS_DIR"


def repo_root() -> Path:
    """The course checkout: the folder holding ``pyproject.toml`` above this package."""
    here = Path(__file__).resolve().parents[2]          # qlora_helpers/common/files.py -> the checkout
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd()


@functools.cache
def _umask() -> int:
    """The process's umask, read once (setting it to read it would race with threads creating files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(path: Path | None = None, folder: bool = False) -> int:
    """The permissions a file (or folder) the user creates gets: ``path``'s own where it exists, else what the
    umask leaves of rw (rwx) for all; ``mkstemp``/``mkdtemp`` would leave 0600/0700, readable by the owner alone."""
    if path is not None and path.exists() and not path.is_symlink():
        return path.stat().st_mode & 0o777
    return (0o777 if folder else 0o666) & ~_umask()


def set_mode(path, mode: int) -> None:
    """``chmod``, where the file system has modes (FAT, exFAT and some network shares refuse it: nothing lost)."""
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w"):
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed.

    Readers see the old file or the new one, never half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        set_mode(tmp, user_mode(path))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_folder(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """Replace a whole folder at once: ``write(tmp)`` fills a new version, one rename swaps it in.

    ``folder`` is a symbolic link to its current version (``.NAME.v...`` beside it): a rename of a link
    is atomic where a rename over a non-empty folder is not, so readers (``PeftModel.from_pretrained``)
    see the old version or the new one, never a mix nor nothing. A real folder from before is moved
    aside once; versions a killed writer left behind are removed on the next write.
    """
    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    current = os.readlink(folder) if folder.is_symlink() else None
    for stale in parent.glob(f".{folder.name}.v*"):
        if stale.name != current:
            shutil.rmtree(stale, ignore_errors=True)
    version = Path(tempfile.mkdtemp(prefix=f".{folder.name}.v", dir=parent))
    try:
        set_mode(version, user_mode(folder=True))
        write(version)
        settle_tree(version)                 # contents on disk before the rename makes them visible
    except BaseException:                   # a failed write (a full disk) leaves no partial version behind
        shutil.rmtree(version, ignore_errors=True)
        raise
    link = parent / f".{folder.name}.link-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)
    if folder.is_dir() and not folder.is_symlink():
        aside = parent / f".{folder.name}.v-old-{os.getpid()}"
        os.replace(folder, aside)
    os.replace(link, folder)
    if current:
        shutil.rmtree(parent / current, ignore_errors=True)
    for old in parent.glob(f".{folder.name}.v-old-*"):
        shutil.rmtree(old, ignore_errors=True)
    return folder


COURSE_FILES = ".course_files.json"   # in a folder the course wrote whole: the names it wrote there


def course_files(folder: str | Path) -> set[str] | None:
    """The names ``record_course_files`` listed in ``folder`` (the manifest itself included), or ``None`` when it
    holds no readable manifest: then the folder is the user's, and the course replaces none of it."""
    try:
        names = json.loads((Path(folder) / COURSE_FILES).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(n) for n in names} | {COURSE_FILES} if isinstance(names, list) else None


def record_course_files(folder: str | Path, names) -> Path:
    """Write ``folder/.course_files.json``, the list of files the course wrote there, so that a later run may
    replace exactly those (``course_files``) and refuses a folder holding anything else."""
    return atomic_write_json(Path(folder) / COURSE_FILES, {"files": sorted(set(names))})


def claim_course_files(folder: str | Path, names, *, unchanged: Callable[[Path], bool] = lambda path: False
                       ) -> list[str]:
    """Record ``names`` in ``folder``'s ``.course_files.json`` before the course writes them (a killed write leaves
    none unrecorded), unless the folder holds a file of one of those names that the course did not write: then
    nothing is recorded and those names come back, for the caller's one-line refusal. ``unchanged(path)``: such a
    file may stay, as the write leaves it as it is (it holds the same bytes)."""
    folder = Path(folder)
    ours = course_files(folder) or set()
    taken = [n for n in names if (folder / n).exists() and n not in ours and not unchanged(folder / n)]
    if not taken:
        folder.mkdir(parents=True, exist_ok=True)
        record_course_files(folder, ours | set(names))
    return taken


def foreign_files(folder: str | Path) -> list[str]:
    """The names in ``folder`` (top level) the course did not write: all of them when it holds no manifest."""
    folder = Path(folder)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    ours = course_files(folder) or set()
    return [n for n in present if n not in ours]


def replace_folder(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """Write a whole folder and put it in place of ``folder``, which stays a real folder (not a link).

    ``write(tmp)`` fills a hidden folder beside it; only then is the old one renamed aside
    (``.NAME.old-PID``), the new one renamed to ``folder`` and the old one deleted. A crash while writing leaves
    the old folder as it was; between the two renames, the old version waits in ``.NAME.old-PID``. The caller
    decides beforehand that the old folder may go (``foreign_files``).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.new-"))
    aside = folder.parent / f".{folder.name}.old-{os.getpid()}"
    set_mode(tmp, user_mode(folder if folder.is_dir() else None, folder=True))   # not mkdtemp's 0700
    try:
        write(tmp)
        settle_tree(tmp)
        if folder.is_symlink():         # a version written by ``atomic_folder``: the link goes, then its target
            aside = folder.parent / os.readlink(folder)
            folder.unlink()
        elif folder.exists():
            os.replace(folder, aside)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if aside.parent == folder.parent and aside.name.startswith(f".{folder.name}."):
        shutil.rmtree(aside, ignore_errors=True)
    return folder


def settle_tree(folder: Path) -> None:
    """Every file under ``folder`` on disk (before a rename makes them visible), with the permissions the user's
    umask gives (safetensors writes its files 0600: a merged model would be unreadable to anyone else)."""
    mode = user_mode()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            set_mode(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def write_new_folder(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """Write a folder once: ``write(tmp)`` fills a new folder beside it, one rename puts it in place.

    An existing folder (one holding ``config.json``, as a ``from_pretrained`` folder does) is returned as
    it is; a crash never leaves half of one, and when another process wrote it meanwhile its copy is kept.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        set_mode(tmp, user_mode(folder=True))
        write(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # written meanwhile by another process: keep that one
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def remove_folder(folder: str | Path) -> None:
    """Remove a folder so that no reader sees part of it: one rename hides it, then it is deleted.

    The hidden name is ``.NAME.removing-PID`` beside it; what a killed removal left there goes the next
    time that folder is removed, or with ``remove_leftovers``.
    """
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        aside = folder.parent / f".{folder.name}.removing-{os.getpid()}"
        os.replace(folder, aside)
    remove_leftovers(folder.parent, f".{folder.name}.removing-*")


def remove_leftovers(parent: str | Path, pattern: str = ".*.removing-*") -> int:
    """Delete the hidden folders ``remove_folder`` (or a killed writer) left in ``parent``; how many went."""
    parent = Path(parent)
    leftovers = list(parent.glob(pattern)) if parent.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return len(leftovers)


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or repo_root() / "runs" / "interactive")


def save_results(name: str, data: dict) -> Path:
    """Write a notebook's key figures to ``<results_dir>/<name>.json`` and return the path."""
    path = atomic_write_json(results_dir() / f"{name}.json", data)
    print(f"results written to {path}")
    return path


RESULT_KEYS = ("benchmark", "figures")   # what every file written by bench.write_benchmark holds


def read_result_file(path: str | Path, *, keys=RESULT_KEYS, rewrite: str = "the script in benchmarks/ that wrote it"
                     ) -> dict:
    """A result JSON, refused in one line when it is not JSON or comes from an older schema (a key missing).

    ``keys`` are top-level keys, or ``"figures.modes"`` for a key inside one; ``rewrite`` is the command
    that writes a current file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON result file ({err}): run {rewrite} again to rewrite it") from None
    for key in keys:
        if value(data, key, default=None) is None:
            raise ValueError(f"{path} is from an older schema (no '{key}'): run {rewrite} again to rewrite it, "
                             "or move the file away")
    return data


def load_benchmark(name: str) -> dict:
    """Read ``benchmarks/results/<name>.json`` (written on a GPU by a script in ``benchmarks/``)."""
    path = repo_root() / "benchmarks" / "results" / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the matching script in benchmarks/ on a GPU to create it")
    return read_result_file(path)


def optional_benchmark(name: str) -> dict | None:
    """``load_benchmark(name)``, or ``None`` when no GPU run has written the file yet."""
    try:
        return load_benchmark(name)
    except FileNotFoundError:
        return None


def state_digest(state: dict) -> str:
    """sha256 of the tensors' bytes in name order: equal digests mean bit-identical weights (bf16 included).

    The processes of a data-parallel run each compute it to show that they hold the same adapter.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
