"""The output folder of a training command (``sft``, ``vlm``): what the course wrote there, its checkpoints, a resume.

The rules, the same for both commands:

- **nothing a user owns is removed.** Every name the course writes into the folder is recorded in
  ``.course_files.json`` before it is written; ``--overwrite_output_dir`` removes only those, and only once every
  setting, data file and the model have been checked (``RunFolder.start``). A file of the user's that bears a
  name the run writes is refused, not replaced.
- **no trap.** ``inspect_folder`` reads the folder, writes nothing and says what it holds in one line: a run to
  continue (``--resume``), one that stopped before its first checkpoint (``--resume`` starts it from step 0), a
  finished one, someone else's files. ``checkpoints/latest`` naming a checkpoint that is missing, cut short or
  damaged is pointed at the newest whole one; a damaged checkpoint is moved aside, saying so.
- **a resume changes nothing that changes the result** (``check_settings``): each checkpoint's ``state.json``
  holds the run's settings and the digest of its data; a resume may change only ``may_change`` (how long it
  trains, the evaluation, saving and speed settings), and says which it changed.
- **a full disk is one line** (``disk_full_is_one_line``): the checkpoint cut short is removed, the line names the
  folder and the ``--resume`` that continues.

Example: ``inspect_folder("outputs/sft", resume=True, overwrite=False, writes=SFT_WRITES)`` on a folder whose run
was killed at step 7 with ``save_steps 5`` gives ``RunFolder(checkpoint=.../checkpoint-5, notes=[])``.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from qlora_helpers.common.assets import sha256_file
from qlora_helpers.common.files import (
    COURSE_FILES,
    atomic_write_json,
    atomic_write_text,
    course_files,
    record_course_files,
    remove_folder,
    remove_leftovers,
)

MANIFEST = COURSE_FILES
CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "state.json"     # written last into a checkpoint: its presence means the checkpoint is whole
DAMAGED = "damaged-"        # the prefix of a checkpoint moved aside
# What a resume may change, for both commands (each adds its own): how long it trains, how often it evaluates and
# saves, the device; the data file's name (its contents are compared: ``data_sha256``). ``UNCOMPARED``: the flags
# that start it, not settings of the run.
MAY_CHANGE = ("max_steps", "eval_steps", "save_steps", "save_total_limit", "data_path", "device")
UNCOMPARED = ("output_dir", "resume", "overwrite_output_dir")
# what a run writes into checkpoints/: the Trainer's checkpoint-N (tmp-checkpoint-N while it saves), the pointer,
# damaged checkpoints moved aside, and the hidden leftovers of killed writes and removals
CHECKPOINT_NAMES = ("checkpoint-*", "tmp-checkpoint-*", LATEST, f"{DAMAGED}*", ".checkpoint-*", f".{LATEST}.*",
                    f".{DAMAGED}*")


# --------------------------------------------------------------------------- what the course wrote
def recorded(out: Path) -> set[str]:
    """The names the course recorded writing into ``out`` (``files.COURSE_FILES``); none when it holds no record."""
    return course_files(out) or set()


def record(out: Path, *names: str) -> None:
    """Add ``names`` to ``out``'s record, before they are written (a kill in between leaves a name too many)."""
    names_now = recorded(out)
    if not set(names) <= names_now:
        record_course_files(out, names_now | set(names))


def _leftover_of(name: str, course: set[str]) -> bool:
    """A hidden name an atomic write of a course file leaves when killed (``.NAME.*``, ``.tmp-final-*``)."""
    return name.startswith(".tmp-final-") or any(name.startswith(f".{c}.") for c in course | {MANIFEST})


def _entries(out: Path) -> tuple[list[str], list[str]]:
    """(the course's names present in ``out``, the user's)."""
    course = recorded(out)
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    mine = [n for n in names if n in course or n == MANIFEST or _leftover_of(n, course)]
    return mine, [n for n in names if n not in mine]


def _users_checkpoint_files(out: Path) -> list[str]:
    """The names in the course's ``checkpoints/`` that no run writes there (``CHECKPOINT_NAMES``): a user's."""
    root = out / CHECKPOINTS
    if CHECKPOINTS not in recorded(out) or root.is_symlink() or not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not any(fnmatch.fnmatch(p.name, n) for n in CHECKPOINT_NAMES))


def remove_course_files(out: Path) -> None:
    """Remove every name the course recorded in ``out`` (and what its killed writes left), nothing else."""
    course = recorded(out)
    for path in sorted(Path(out).iterdir()):
        if not (path.name in course or _leftover_of(path.name, course)):
            continue
        if path.is_dir() or path.is_symlink():      # best/ and final/ are links to their hidden version: both go
            remove_folder(path)
        else:
            path.unlink()
    record_course_files(out, [])


# --------------------------------------------------------------------------- checkpoints
def _step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def complete_checkpoints(out: Path) -> list[Path]:
    """``checkpoints/checkpoint-N`` folders holding ``state.json``, oldest first."""
    root = Path(out) / CHECKPOINTS
    found = root.glob("checkpoint-*") if root.is_dir() else []
    return sorted((p for p in found if p.is_dir() and (p / COMPLETE).is_file()), key=_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, if it is complete; else ``None``."""
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / COMPLETE).is_file() else None


def clean_partial_checkpoints(output_dir) -> int:
    """Remove what a killed run left: checkpoints cut short (no ``state.json``), old ones mid-removal."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return 0
    cut_short = [p for p in root.glob("checkpoint-*") if p.is_dir() and not (p / COMPLETE).is_file()]
    for path in cut_short:
        remove_folder(path)
    return len(cut_short) + remove_leftovers(root)


def damage(checkpoint: Path) -> str | None:
    """What makes a complete checkpoint unloadable, as "FILE: why" (a truncated or corrupt file), or ``None``.

    safetensors files are opened (header and size), torch's zip files (``optimizer.pt``, ``rng_state.pth``, ...)
    read through with their CRCs checked, JSON files parsed.
    """
    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    fh.keys()
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad:
                    return f"{path}: member {bad} fails its CRC check"
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:       # safetensors, zipfile, json and OS errors alike: the file cannot be read
            return f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    return None


# --------------------------------------------------------------------------- reading a folder before a run
@dataclass
class RunFolder:
    """What ``inspect_folder`` found in an output folder and what ``start`` will do to it."""

    out: Path
    checkpoint: Path | None = None            # the checkpoint to resume from
    notes: list[str] = field(default_factory=list)   # lines printed once every check passed
    overwrite: bool = False                   # remove the course's files at the start
    aside: list[Path] = field(default_factory=list)  # damaged checkpoints to move aside
    repoint: bool = False                     # rewrite checkpoints/latest

    def check_settings(self, now: dict, *, may_change: tuple, data: str = "data_path") -> dict:
        """With a checkpoint to resume, refuse settings or data other than its own (``check_settings``) and note
        the changes allowed; returns ``now`` as a checkpoint records it."""
        now = plain(now)
        if self.checkpoint is not None:
            state = json.loads((self.checkpoint / COMPLETE).read_text())
            step = state.get("step", 0)
            notes = check_settings(self.checkpoint, plain(state.get("fingerprint") or {}), now, step=step,
                                   may_change=may_change, data=data)
            if not notes and not (self.aside or self.repoint):   # a repair's note names the checkpoint already
                notes = [f"resuming {self.checkpoint.name} (step {step})"]
            self.notes += notes
        return now

    def start(self, names=(), *, config: tuple[str, dict] | None = None, show=print) -> Path:
        """Make the changes planned (by the main process, once every check passed): the earlier run's files go
        (``--overwrite_output_dir``), damaged checkpoints are moved aside, ``latest`` is repaired; ``names`` are
        recorded and ``config`` (file name, settings) written; the notes are shown."""
        with disk_full_is_one_line(self.out):
            if self.overwrite:
                remove_course_files(self.out)
            for path in self.aside:
                os.replace(path, aside_name(path))
            if self.repoint and self.checkpoint is None:
                (self.out / CHECKPOINTS / LATEST).unlink()
            elif self.repoint:
                atomic_write_text(self.out / CHECKPOINTS / LATEST, f"{self.checkpoint.name}\n")
            self.out.mkdir(parents=True, exist_ok=True)
            record(self.out, *names, *([config[0]] if config else []))
            if config:
                atomic_write_json(self.out / config[0], config[1])
        for line in self.notes:
            show(line)
        return self.out


def aside_name(path: Path) -> Path:
    """Where a damaged checkpoint is moved: ``damaged-checkpoint-N`` beside it (``.2``, ``.3`` ... if taken)."""
    target, n = path.parent / f"{DAMAGED}{path.name}", 1
    while target.exists():
        n += 1
        target = path.parent / f"{DAMAGED}{path.name}.{n}"
    return target


def _writable_folder(out: Path) -> None:
    """Refuse an output_dir that cannot be created or written, naming the part of the path at fault."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"output_dir {out} cannot be created: {probe} is a file, not a folder; "
                         "choose another --output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {out} is not writable ({probe} refuses writes for this user): "
                         "choose a folder you can write to with --output_dir")


def _shown(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def inspect_folder(output_dir, *, resume: bool, overwrite: bool, writes=(), finished: str = "") -> RunFolder:
    """Check ``output_dir`` for a run (writing nothing) and plan its start; one line for a folder it cannot use.

    ``writes``: patterns of the names the run writes (a user's file matching one is refused, never replaced);
    ``finished``: the file a finished run leaves (its summary).
    """
    out = Path(output_dir)
    _writable_folder(out)
    mine, users = _entries(out)
    clashes = [n for n in users if any(fnmatch.fnmatch(n, w) for w in writes)]
    if clashes and not resume:
        raise ValueError(f"output_dir {out} holds {_shown(clashes)}, not written by a course run, which this run "
                         "would replace: move it elsewhere or choose another --output_dir")
    if overwrite:
        foreign = _users_checkpoint_files(out)
        if foreign:
            raise ValueError(f"output_dir {out / CHECKPOINTS} holds {_shown(foreign)}, not written by a course run, "
                             "which --overwrite_output_dir would remove with the checkpoints: move it elsewhere "
                             "or choose another --output_dir")
        return RunFolder(out, overwrite=bool(mine))
    has_run = bool(recorded(out)) or (out / CHECKPOINTS / LATEST).is_file()
    if resume:
        if not has_run:
            raise ValueError(f"nothing to resume in {out}: no course run there; run without --resume")
        return _resume_plan(out, finished)
    if has_run:
        raise ValueError(_held_run(out, finished))
    if users:
        raise ValueError(f"output_dir {out} already holds {_shown(users)} (not from a course run): choose another "
                         "--output_dir, or pass --overwrite_output_dir to train beside them (they are kept)")
    return RunFolder(out)


def _held_run(out: Path, finished: str) -> str:
    """The line refusing a folder that holds a course run, with the flag that continues it."""
    whole = complete_checkpoints(out) or [p for p in [latest_checkpoint(out)] if p is not None]
    other = "--overwrite_output_dir to replace it, or choose another --output_dir"
    if whole and finished and (out / finished).is_file():
        return f"output_dir {out} holds a finished run ({finished}) with checkpoints up to {whole[-1].name}: pass " \
               f"--resume with a larger --max_steps to train it further, {other}"
    if whole:
        return f"output_dir {out} holds a run with checkpoints up to {whole[-1].name}: pass --resume to continue " \
               f"it, {other}"
    if finished and (out / finished).is_file():
        return f"output_dir {out} holds a finished run ({finished}) and no checkpoint: pass {other}"
    return f"output_dir {out} holds a run that stopped before its first checkpoint: pass --resume to start it " \
           f"again from step 0, {other}"


def _resume_plan(out: Path, finished: str) -> RunFolder:
    """The checkpoint ``--resume`` continues from: ``latest``, else the newest whole one (saying why), else step 0."""
    plan, pointer = RunFolder(out), out / CHECKPOINTS / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else ""
    candidates = complete_checkpoints(out)
    if named and (out / CHECKPOINTS / named / COMPLETE).is_file() and out / CHECKPOINTS / named not in candidates:
        candidates.append(out / CHECKPOINTS / named)          # a checkpoint of another name (older layouts)
    broken = []
    for path in reversed(candidates):
        why = damage(path)
        if why is None:
            plan.checkpoint = path
            break
        broken.append(why)
        plan.aside.append(path)
    if broken and plan.checkpoint is None:
        raise ValueError(f"{broken[0]}: the checkpoint is damaged and no earlier one is whole; pass "
                         "--overwrite_output_dir to train again from step 0 (or restore the file)")
    for why, path in zip(broken, plan.aside):
        plan.notes.append(f"{why}: moved {path.name} aside to {aside_name(path).name} and resuming from "
                          f"{plan.checkpoint.name}, the last whole checkpoint")
    if plan.checkpoint is None:
        if finished and (out / finished).is_file():
            raise ValueError(f"nothing to resume in {out}: it holds a finished run ({finished}) and no checkpoint; "
                             "pass --overwrite_output_dir instead of --resume to train it again")
        plan.notes.append(f"no checkpoint in {out / CHECKPOINTS} yet (the run stopped before its first save): "
                          "--resume starts it from step 0")
        if named:
            plan.repoint = True
            plan.notes.append(f"{pointer} named {named}, which is not a whole checkpoint: removed it")
    elif named != plan.checkpoint.name:
        plan.repoint = True
        if not broken:
            why = "an older one" if (out / CHECKPOINTS / named / COMPLETE).is_file() else "not a whole checkpoint"
            plan.notes.append(f"{pointer} named {named or 'nothing'}, {why}: pointed it at {plan.checkpoint.name}, "
                              "the newest whole one")
    return plan


# --------------------------------------------------------------------------- the settings of a resume
def data_digest(path) -> str:
    """sha256 of a data file's bytes (``assets.sha256_file``, as the assets are checked)."""
    return sha256_file(Path(path))


def plain(settings: dict) -> dict:
    """``settings`` as JSON gives them back (tuples as lists), nested sections flattened to ``section.key``."""
    flat = {}
    for key, value in json.loads(json.dumps(settings, default=str)).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in plain(value).items()})
        else:
            flat[key] = value
    return flat


def check_settings(checkpoint: Path, saved: dict, now: dict, *, step: int, may_change: tuple, data: str) -> list[str]:
    """Refuse, in one line, a resume whose settings or data differ from those ``checkpoint`` (written at ``step``)
    was written with; the lines naming the changes it allows (``may_change``). ``data``: the data file's setting."""
    changed = []
    for key in sorted(saved.keys() & now.keys() - set(UNCOMPARED)):
        old, new = saved[key], now[key]
        if old == new:
            continue
        if key == "data_sha256":
            raise ValueError(f"{data} {now.get(data) or 'the training data'} has changed since {checkpoint.name} was "
                             f"written (sha256 {str(old)[:12]} -> {str(new)[:12]}): resume on the data it trained on, "
                             "or start a new run with --overwrite_output_dir or another --output_dir")
        if key not in may_change:
            raise ValueError(f"output_dir {checkpoint.parent.parent} holds a different run: {checkpoint.name} was "
                             f"written with {key}={old!r}, this run has {key}={new!r}; resume with its settings, or "
                             f"choose another --output_dir (a resume may change only {', '.join(may_change)})")
        changed.append(f"{key} {old!r} -> {new!r}")
    if 0 < now.get("max_steps", 0) <= step:
        raise ValueError(f"max_steps={now['max_steps']} ends before {checkpoint} (step {step}): give a larger "
                         "--max_steps to continue it")
    return [f"resuming {checkpoint.name} (step {step}) with {', '.join(changed)} (a resume may change these)"] \
        if changed else []


# --------------------------------------------------------------------------- a full disk
def _disk_full(err: BaseException | None) -> bool:
    while err is not None:
        text = str(err)
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "file write failed" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def disk_full_is_one_line(out: Path):
    """A write that fails for want of space (``OSError`` ENOSPC, torch's "file write failed") becomes one line
    naming the folder and the ``--resume`` that continues; the checkpoint it cut short is removed first."""
    try:
        yield
    except Exception as err:            # OSError, torch's RuntimeError, safetensors' SafetensorError alike
        if not _disk_full(err):
            raise
        cut = sorted(p.name for p in (Path(out) / CHECKPOINTS).glob("checkpoint-*") if not (p / COMPLETE).exists())
        clean_partial_checkpoints(out)
        whole = latest_checkpoint(out)
        removed = f" ({CHECKPOINTS}/{', '.join(cut)} cut short: removed)" if cut else ""
        then = f"continues from {whole.name}" if whole else "starts again from step 0"
        raise ValueError(f"no space left on the disk of {out} while saving{removed}: free some space, then pass "
                        f"--resume ({then})") from None
