"""Files that a kill, a full disk or another process writing beside them never leave half-done or taken for
whole: the project's bottom layer, which every module that writes files imports (and which imports none of them).

- Atomic writes: a file is replaced all at once, or appended to whole or not at all.
- Checksums: each file's size and sha256, recorded in a folder's checksums.json and checked before it is used
  (checksums.py, the one check; check_intact here refuses a run's damaged folder as a ConfigError).
- CSV rows: written, appended, rewritten and read back, a row cut short by a kill dropped.
- Disk refusals: a write the disk has no room for raises DiskSpaceError, naming the folder and the bytes needed.
- Staging entries: a folder or file built beside its final place under a lock, then moved into place by a rename;
  what killed writers left behind is swept, what live ones are writing is kept.
"""

import contextlib
import csv
import errno
import fcntl
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import checksums
from checksums import CHECKSUMS, file_record
import config as config_lib


class DiskSpaceError(RuntimeError):
    """Not enough free disk for what the run writes next (found before the write, or by a write that failed); the
    message gives the folder and the bytes needed."""


# --- atomic files -------------------------------------------------------------------------------------------------

def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` all at once: a reader sees the old file or the new one, never half of it.

    The temporary file has a unique name, so writers in other processes (runs that share a cache folder) never
    write into each other's temporary file.
    """
    path = Path(path)
    with refuse_full_disk(path.parent, len(text.encode()), path.name,
                          "its previous version is kept: free some space, then run the same command again"):
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", newline="") as f:  # newline="": text (a CSV's \r\n row ends) is written as it is
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def append_atomically(path: Path, text: str) -> None:
    """Add `text` at the end of the file `path` (created if missing) whole, or not at all: a write that fails (a full
    disk: DiskSpaceError) is cut back off, so the file keeps what it held and never ends in part of `text`, a row
    cut short that a reader takes for damage. (A kill mid-write can still cut it short: replace_csv_rows drops
    such a row when the log is next rewritten.)"""
    path = Path(path)
    data = text.encode()
    with refuse_full_disk(path.parent, len(data), path.name,
                          "what it held before is kept: free some space, then continue the run with "
                          "`python main.py --resume` and its run folder"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the file descriptor `fd`: one os.write may take only part of it (a disk filling up
    takes what it has room for, and the next write fails)."""
    unwritten = memoryview(data)
    while unwritten:
        unwritten = unwritten[os.write(fd, unwritten):]


# --- checksums: damage found before a saved folder is used (checksums.py) ----------------------------------------

def write_checksums(folder: Path) -> None:
    """Record the size and sha256 of each file of `folder` in its checksums.json, written after them (atomically):
    folder_damage checks them before the folder is used again."""
    records = {path.name: file_record(path) for path in sorted(folder.iterdir())
               if path.is_file() and path.name != CHECKSUMS}
    write_atomically(folder / CHECKSUMS, json.dumps(records, indent=2) + "\n")


def check_intact(folder: Path, what_to_do: str) -> None:
    """checksums.check_intact for the run's own folders, refused as a ConfigError (bad input: exit code 2), naming
    the file and what was wrong with it."""
    try:
        checksums.check_intact(folder, what_to_do)
    except checksums.DamagedFolderError as error:
        raise config_lib.ConfigError(str(error)) from None


# --- CSV rows -----------------------------------------------------------------------------------------------------

def replace_csv_rows(path: Path, columns: list[str], keep, new_rows: list[dict]) -> None:
    """Rewrite a CSV with the existing rows for which keep(row) is true, then `new_rows`; atomically.

    A row cut short by a kill (fewer fields than the header) is dropped. A file that is not CSV text (bytes that are
    not UTF-8, say) is set aside as it is (set_aside_damaged), and the CSV starts afresh with `new_rows`: the logs
    rewritten here (train_log.csv, samples.csv) are records of the run, which a resume does not need, and refusing
    them would stop a run, after a round's training for samples.csv, over a file it can do without.
    """
    rows = read_csv_rows(path)
    if rows is None and path.exists():
        set_aside_damaged(path)
    kept = [row for row in rows or [] if is_complete_row(row) and keep(row)]
    write_csv_rows(path, columns, kept + new_rows)


def set_aside_damaged(path: Path) -> Path:
    """Move the file `path`, which is not CSV text, to `path`.damaged-<time>, with a warning naming both: its bytes
    are kept for a look or a repair by hand, never discarded. (A resume restores a damaged metrics.csv from the
    manifest's journal before anything rewrites it: restore_metric_rows.)"""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    print(f"warning: {path} is not CSV text (bytes that are not UTF-8, say): moved as it is to {aside}; "
          f"{path.name} starts afresh with the rows written from now on", file=sys.stderr)
    return aside


def write_csv_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Replace the CSV file `path` with `rows` under a header of `columns`, atomically."""
    write_atomically(path, csv_text(columns, rows))


def csv_text(columns: list[str], rows: list[dict], header: bool = True) -> str:
    """The text of a CSV file of `columns` holding `rows`; without its header line, for rows appended to one."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def append_csv_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Add `rows` at the end of the CSV file `path`, under a header of `columns` when the file is new or empty; all
    of them, or none when the write fails (append_atomically)."""
    has_header = path.is_file() and path.stat().st_size > 0
    append_atomically(path, csv_text(columns, rows, header=not has_header))


def csv_text_rows(columns: list[str], rows: list[dict]) -> list[dict]:
    """`rows` as a CSV file of `columns` holds them, read back: every value as its text ("" for None). Written again,
    they give the same bytes; compared with a file's rows (read_csv_rows), they tell whether it still holds them."""
    return list(csv.DictReader(io.StringIO(csv_text(columns, rows), newline="")))


def read_csv_rows(path: Path) -> list[dict] | None:
    """The rows of the CSV file `path` as csv.DictReader reads them (text values; a row cut short has None for the
    fields it lost, a row too long a None key), or None when it cannot be read: missing, or not CSV text."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):  # csv.Error: a NUL byte, say
        return None


def is_complete_row(row: dict) -> bool:
    """Whether a row read by csv.DictReader has exactly its header's fields (one cut short has fewer)."""
    return None not in row and None not in row.values()


# --- disk ---------------------------------------------------------------------------------------------------------

def check_disk_space(folder: Path, needed: int, what: str, advice: str) -> None:
    """Raise DiskSpaceError, naming `folder` and the bytes free and needed, unless its disk can take `needed` more
    bytes for `what`."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(f"{folder}: {free:,} bytes free, but about {needed:,} bytes are needed for {what}; "
                             f"{advice}")


@contextlib.contextmanager
def refuse_full_disk(folder: Path, needed: int, what: str, advice: str):
    """Turn a write of `what` into `folder` that fails for want of disk into DiskSpaceError, naming the folder and
    `needed`, the bytes the write takes (estimated), with `advice`.

    Python's own writes say so (OSError ENOSPC), but torch.save reports only that its write failed (a RuntimeError)
    and safetensors raises an error of its own: any failure counts when the disk has less than `needed` bytes free.
    """
    try:
        yield
    except DiskSpaceError:  # from a write inside this one, which names itself
        raise
    except Exception as error:
        free = shutil.disk_usage(folder).free
        if free >= needed and not (isinstance(error, OSError) and error.errno == errno.ENOSPC):
            raise
        raise DiskSpaceError(f"{folder}: the disk is full: writing {what} failed ({error}); about {needed:,} bytes "
                             f"are needed there, {free:,} are free; {advice}") from error


# --- paths and staging entries ----------------------------------------------------------------------------------

def looks_like_local_path(name: str) -> bool:
    """Whether a model or data `name` can only be meant as a local path: hub names are "name" or "owner/name",
    and "owner" is no folder here."""
    parent = Path(name).parent
    return name.startswith(("/", ".", "~")) or name.count(os.sep) > 1 or (parent != Path(".") and parent.is_dir())


STAGING_INFIX = ".partial-"  # .NAME.partial-XXXXXXXX: a staging entry of NAME (see staging)


def try_lock(path: Path, create: bool = True) -> int | None:
    """A descriptor of the file or folder `path` that holds its lock, or None while another process holds it.

    An flock: the kernel releases it when its holder ends, however it ends (SIGKILL included), so a held lock is a
    live writer and a free one means whatever it guards is a dead writer's, with no guessing from process ids
    (reused, or another node's) or from ages. (On a file system that keeps flocks local to a node, such as Lustre
    mounted with localflock, processes on different nodes should not write into one folder at the same time.)

    A holder removes its entry before it lets go, so a lock taken on an entry no longer at `path` is let go: for a
    lock file (`create`: made if need be) the lock is taken again on the new file; otherwise the entry is gone, and
    FileNotFoundError says so, as it does when there was none.
    """
    while True:
        fd = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)
        if not create:
            raise FileNotFoundError(errno.ENOENT, "removed by the holder of its lock", str(path))


@contextlib.contextmanager
def staging(final: Path, folder: bool):
    """A new, empty staging entry beside `final`, a folder or else a file, for its writer to fill and then move to
    `final` (publish_folder, os.replace); removed if the writer stops before that.

    Its lock (try_lock) is held until then, so remove_dead_staging tells the leftover of a writer that was killed
    from the entry of one still writing (another run sharing the folder), and leaves the second alone.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}{STAGING_INFIX}"
    while True:
        if folder:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
            os.close(fd)
            path = Path(name)
        with contextlib.suppress(FileNotFoundError):  # another process's sweep removed it before we locked it
            lock = try_lock(path, create=False)
            if lock is not None:  # else that sweep holds it, and removes it
                break
    try:
        yield path
    finally:
        if folder:
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        os.close(lock)


def remove_dead_staging(final: Path) -> list[Path]:
    """Remove the staging entries of `final` (see staging) that writers killed before they finished left behind,
    and keep those of writers still at work; the removed ones."""
    removed = []
    for leftover in sorted(final.parent.glob(glob.escape(f".{final.name}{STAGING_INFIX}") + "*")):
        try:
            lock = try_lock(leftover, create=False)
        except FileNotFoundError:  # another process removed it first
            continue
        if lock is None:  # its writer is alive
            continue
        try:
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        finally:
            os.close(lock)
        print(f"removed {leftover}: an unfinished copy of {final.name} that a killed process left")
        removed.append(leftover)
    return removed


def publish_folder(staging: Path, final: Path, is_same_build: Callable[[Path], bool]) -> None:
    """Move the finished folder `staging` to `final` by a rename, so that no reader ever sees half a folder.

    A folder already at `final` is replaced, unless `is_same_build(final)` says it holds what `staging` holds:
    another process (an array task, another run) finished the same build first. Then theirs is kept and ours
    dropped, so two processes building the same cache at once both succeed.
    """
    try:
        if final.exists() and not is_same_build(final):
            shutil.rmtree(final)  # a stale build for other settings
        try:
            os.rename(staging, final)
        except OSError:
            if not (final.exists() and is_same_build(final)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
