"""Damage found before a saved folder is used: each file's size and sha256, recorded in the folder's checksums.json
when it was written, compared with the file as it is now.

The one verifier of saved folders (members, checkpoints, best weights; the teacher cache's shards use file_damage).
It imports only the standard library, so that it also ships, beside the ensemble's code (ensemble.modelling_code),
into a saved ensemble's folder, which then checks its members where it is loaded, without this project. Writing
checksums.json is files.write_checksums's (atomically).
"""

import hashlib
import json
import os
from pathlib import Path

CHECKSUMS = "checksums.json"  # in a checkpoint, best or member folder: each of its files' size and sha256


class DamagedFolderError(ValueError):
    """A saved folder whose files are not what its checksums.json recorded; the message names the file, what changed
    and what to do. Nothing was loaded from the folder."""


def file_record(path: Path) -> dict:
    """The size and sha256 of a file, read in a stream."""
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def file_damage(path: Path, recorded: dict) -> str | None:
    """How the file at `path` differs from `recorded`, its file_record when it was written (missing, cut short or
    grown, or overwritten with other bytes of the same size); None when it does not."""
    if not path.is_file():
        return f"{path} is missing"
    found = file_record(path)
    if found["size"] != recorded["size"]:
        return f"{path}: holds {found['size']:,} bytes, but {recorded['size']:,} when it was written"
    if found["sha256"] != recorded["sha256"]:
        return (f"{path}: holds {found['size']:,} bytes with sha256 {found['sha256']}, but had sha256 "
                f"{recorded['sha256']} when it was written")
    return None


def folder_damage(folder: Path) -> str | None:
    """What is wrong with `folder` against its checksums.json (the first file that is not as recorded, or the record
    itself unreadable); None when nothing is, or when it has no checksums.json: a folder saved before they were
    recorded is taken as it is."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path} is unreadable ({error})"
    problems = (file_damage(Path(folder) / name, record) for name, record in recorded.items())
    return next((problem for problem in problems if problem is not None), None)


def check_intact(folder: Path, what_to_do: str) -> None:
    """Refuse (DamagedFolderError) a folder that folder_damage finds damaged, naming the file, what was wrong with it
    and `what_to_do`."""
    problem = folder_damage(folder)
    if problem is not None:
        raise DamagedFolderError(f"{problem}: {folder} is damaged and nothing was loaded from it; {what_to_do}")
