"""What keeps a run's working directory trustworthy.

* :class:`WorkdirLock`: one run per workdir. A kernel lock (``flock``) on
  ``workdir/.lock`` that dies with its process, so a second run is refused at
  once (the message names the holder: pid, host, start time) and a run killed
  by SIGKILL never leaves a lock that blocks its own resumption.
* Verified checkpoints: :func:`write_checksums` records the SHA-256 of every
  file of a saved step; :func:`set_aside_unverified` checks the steps before
  a restore, newest first, and moves any step that does not verify (changed
  bytes, truncated or missing files, an empty directory, no record) to
  ``workdir/damaged_checkpoints/`` -- kept, never deleted -- so that the run
  resumes from the newest intact one.
* :class:`Preemption`: SIGTERM (cloud preemption) and SIGINT (Ctrl-C) ask
  the training loop to save at the next step boundary and stop with
  :class:`Preempted`; a second Ctrl-C aborts at once.
* :func:`json_line`: metrics as strict JSON (non-finite numbers become
  ``null``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
from typing import Any

CHECKSUMS = "arl_checksums.json"
DAMAGED = "damaged_checkpoints"


# -------------------------------------------------------------------- lock --

class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """An exclusive lock on ``workdir`` held for the whole run.

  ``flock`` locks belong to the open file and the kernel drops them when the
  process exits, however it exits. The file is never deleted (deleting a
  lock file races with a process about to lock it); it holds the holder's
  pid, host and start time, for the refusal message. Where the filesystem
  has no ``flock`` (some network filesystems), the recorded pid is checked
  for life on this host instead.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / ".lock"
    self._fd: int | None = None
    self._identity: tuple[int, int] | None = None

  def holder(self) -> dict:
    try:
      return json.loads(self.path.read_text() or "{}")
    except (OSError, ValueError):
      return {}

  def _busy(self) -> WorkdirBusy:
    h = self.holder()
    who = (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started "
           f"{h.get('started', '?')}") if h else "an unknown process"
    return WorkdirBusy(
        f"{self.workdir} is in use by another run ({who}); wait for it to "
        "finish, stop it, or use another --workdir (nothing was changed).")

  def acquire(self) -> WorkdirLock:
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      import fcntl
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise self._busy() from None
    except (ImportError, OSError) as e:   # no flock here: pid liveness
      if isinstance(e, OSError) and e.errno not in (errno.ENOLCK,
                                                    errno.EOPNOTSUPP,
                                                    errno.ENOSYS):
        os.close(fd)
        raise
      h = self.holder()
      if h and h.get("pid") != os.getpid() and (
          h.get("host") != socket.gethostname() or _alive(h.get("pid"))):
        os.close(fd)
        raise self._busy() from None
    record = json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(
            timespec="seconds")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    self._fd = fd
    st = os.fstat(fd)
    self._identity = (st.st_dev, st.st_ino)
    return self

  def check_held(self) -> None:
    """Raises :class:`WorkdirBusy` unless ``workdir/.lock`` is still the
    file this run locked: deleted or replaced during the run, another run
    may have started here, so this one stops before it writes anything."""
    if self._fd is None:
      return
    try:
      st = os.stat(self.path)
      same = (st.st_dev, st.st_ino) == self._identity
    except OSError:
      same = False
    if not same:
      raise WorkdirBusy(
          f"{self.path} was deleted or replaced while this run held it: "
          "another run may be writing in this workdir, so this one stops "
          "without writing (its last checkpoint is kept). Run one command "
          "per workdir, and never delete .lock by hand.")

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)        # drops the flock
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (TypeError, ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True
  return True


# ------------------------------------------------------- file-system errors --

class WorkdirError(RuntimeError):
  """The file system refused an operation of the run (one line: the path,
  what failed and what to do)."""


_ADVICE = {
    errno.EROFS: "the file system is read-only: choose a --workdir on a "
                 "writable one",
    errno.EACCES: "no permission: choose a --workdir you can write to, or fix "
                  "its permissions",
    errno.EPERM: "not permitted: choose a --workdir you can write to",
    errno.ENOSPC: "the disk is full: free space there and run the same "
                  "command again (the previous checkpoint is kept)",
    errno.EDQUOT: "the disk quota is exceeded: free space and run again",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another "
                   "--workdir",
    errno.EEXIST: "a file is in the way of a folder: choose another --workdir",
    errno.EISDIR: "a folder is where the run keeps a file: remove or rename "
                  "it, or choose another --workdir",
    errno.ENOENT: "it does not exist (deleted during the run?)",
}


def os_error_in(error: BaseException) -> OSError | None:
  """``error`` itself or the first OSError it was raised from (orbax wraps
  the file system's errors)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError) and error.errno is not None:
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def describe_os_error(error: OSError, doing: str = "", needs: str = "") -> str:
  """One line: what failed, on which path, why, and what to do."""
  path = error.filename or "?"
  if error.filename2:
    path = f"{path} -> {error.filename2}"
  why = error.strerror or os.strerror(error.errno or 0)
  advice = _ADVICE.get(error.errno, "check the path and the file system")
  what = f"{doing} " if doing else ""
  extra = f" {needs}" if needs else ""
  return f"{what}{path}: {why}; {advice}.{extra}"


def folder_size(path: pathlib.Path) -> int:
  """Bytes of the files under ``path`` (0 if it does not exist)."""
  total = 0
  if path.is_dir():
    for p in path.rglob("*"):
      try:
        total += p.stat().st_size if p.is_file() else 0
      except OSError:
        pass
  return total


# ------------------------------------------------------------- checkpoints --

def _digest(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  return {p.relative_to(step_dir).as_posix(): p
          for p in sorted(step_dir.rglob("*"))
          if p.is_file() and p.name != CHECKSUMS}


def write_checksums(step_dir: str | os.PathLike) -> None:
  """Records the size and SHA-256 of every file of a finished saved step."""
  step_dir = pathlib.Path(step_dir)
  record = {name: {"size": p.stat().st_size, "sha256": _digest(p)}
            for name, p in _files(step_dir).items()}
  write_atomic(step_dir / CHECKSUMS, json.dumps(record, indent=0))


def verify(step_dir: str | os.PathLike) -> str | None:
  """``None`` when the step's files are exactly those recorded, else why not."""
  step_dir = pathlib.Path(step_dir)
  try:
    record = json.loads((step_dir / CHECKSUMS).read_text())
  except FileNotFoundError:
    return (f"it has no {CHECKSUMS} (its save did not finish, or an older "
            "version wrote it)")
  except (OSError, ValueError) as e:
    return f"its {CHECKSUMS} is unreadable ({e})"
  files = _files(step_dir)
  for name in sorted(set(record) - set(files)):
    return f"{name} is missing"
  for name in sorted(set(files) - set(record)):
    return f"{name} was not part of the saved step"
  for name, want in record.items():
    p = files[name]
    if p.stat().st_size != want["size"]:
      return (f"{name} has {p.stat().st_size} bytes, {want['size']} were "
              "saved")
    if _digest(p) != want["sha256"]:
      return f"{name} does not match its saved SHA-256 (changed on disk)"
  return None


def saved_steps(checkpoints: pathlib.Path) -> list[int]:
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir()
                if p.is_dir() and p.name.isdigit())


def set_aside(checkpoints: pathlib.Path, step: int, reason: str,
              log=print) -> pathlib.Path:
  """Moves a step out of the manager's sight, keeping its files."""
  dest_root = checkpoints.parent / DAMAGED
  dest_root.mkdir(exist_ok=True)
  dest = dest_root / str(step)
  n = 1
  while dest.exists():
    n += 1
    dest = dest_root / f"{step}.{n}"
  shutil.move(str(checkpoints / str(step)), str(dest))
  log(f"checkpoint step {step} skipped: {reason}; moved to {dest}.")
  return dest


def set_aside_unverified(checkpoints: str | os.PathLike, log=print
                         ) -> int | None:
  """Sets aside the newest steps that do not verify; returns the newest that
  does (``None``: there is none, the run starts from the beginning)."""
  checkpoints = pathlib.Path(checkpoints)
  for step in reversed(saved_steps(checkpoints)):
    reason = verify(checkpoints / str(step))
    if reason is None:
      return step
    set_aside(checkpoints, step, reason, log)
  return None


# --------------------------------------------------------------- preemption --

class Preempted(Exception):
  """The run saved its state at a step boundary and stopped on a signal."""

  def __init__(self, signum: int, where: str, workdir: pathlib.Path):
    self.signum = signum
    name = signal.Signals(signum).name
    super().__init__(
        f"{name}: saved at {where} in {workdir}; run the same command again "
        "to resume exactly there.")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class Preemption:
  """Turns SIGTERM and SIGINT into a request the training loop polls.

  ``requested`` is the signal number (0: none). Installed only in the main
  thread (Python delivers signals there); elsewhere, and for the signals
  given in ``skip``, the previous handlers stay.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.requested = 0
    self._saving = False
    self._previous: dict[int, Any] = {}

  @contextlib.contextmanager
  def saving(self):
    """A save in progress: a second signal waits for it to finish (an
    interrupted orbax save would leave a half-written step and a traceback)."""
    self._saving = True
    try:
      yield
    finally:
      self._saving = False

  def _handle(self, signum, frame):
    if self.requested and self._saving:
      print("finishing the checkpoint being saved first, then stopping.",
            file=sys.stderr, flush=True)
      return
    if self.requested:                   # second signal: abort at once
      raise KeyboardInterrupt
    self.requested = signum
    if signum == signal.SIGINT:     # someone at a terminal: say what happens
      print("Ctrl-C: saving at the next step boundary (Ctrl-C again aborts "
            "without saving).", file=sys.stderr, flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()


# --------------------------------------------------------------------- json --

def finite_or_none(tree: Any) -> Any:
  """The tree with every non-finite float replaced by ``None``."""
  if isinstance(tree, dict):
    return {k: finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [finite_or_none(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def json_line(record: dict) -> str:
  return json.dumps(finite_or_none(record), allow_nan=False) + "\n"


def log(message: str) -> None:
  """A line on stderr (flushed)."""
  print(message, file=sys.stderr, flush=True)


def write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)

