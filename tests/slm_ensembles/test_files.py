"""files: atomic writes, checksums, CSV rows, disk refusals, staging entries and their leftovers."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_disk
from slm_ensembles import files


def test_replacing_rows_drops_a_round_and_a_cut_short_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("round,model,ce\n0,student,1.5\n1,student,1.2\n1,ensem")  # killed mid-row
    files.replace_csv_rows(path, ["round", "model", "ce"], lambda row: row["round"] != "1",
                               [{"round": 1, "model": "student", "ce": 1.1}])
    assert path.read_text().splitlines() == ["round,model,ce", "0,student,1.5", "1,student,1.1"]
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]  # no temporary file left


def test_not_enough_disk_names_the_folder_and_the_bytes_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(1000))
    with pytest.raises(files.DiskSpaceError) as error:
        files.check_disk_space(tmp_path, 120_000, "one checkpoint", "free some space")
    assert str(error.value) == (f"{tmp_path}: 1,000 bytes free, but about 120,000 bytes are needed for one "
                                "checkpoint; free some space")
    files.check_disk_space(tmp_path, 1000, "one checkpoint", "free some space")  # exactly enough
    monkeypatch.undo()
    files.check_disk_space(tmp_path, 10, "one checkpoint", "free some space")  # a real disk has room for 10


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_an_atomic_write_the_disk_cannot_take_names_the_folder_and_bytes_and_keeps_the_old_file(tmp_path,
                                                                                                monkeypatch):
    path = tmp_path / "manifest.json"
    files.write_atomically(path, "old")
    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(files.DiskSpaceError) as error:
        files.write_atomically(path, "new content")
    assert str(error.value).startswith(f"{tmp_path}: the disk is full: writing manifest.json failed ([Errno 28] No "
                                       "space left on device); about 11 bytes are needed there")
    assert "its previous version is kept" in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] and path.read_text() == "old"


def test_a_write_that_fails_on_a_full_disk_is_a_disk_error_whatever_the_writer_raises(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError without an errno: with less free than the write needs, it
    counts as one; with room to spare it is some other failure, raised as it is."""
    def fails(exception):
        with files.refuse_full_disk(tmp_path, 5000, "optimizer.pt", "free some space"):
            raise exception

    with pytest.raises(RuntimeError, match="^unexpected pos 576 vs 534$"):
        fails(RuntimeError("unexpected pos 576 vs 534"))
    with pytest.raises(files.DiskSpaceError, match="about 5,000 bytes are needed there"):
        fails(OSError(errno.ENOSPC, "No space left on device"))  # with room now: freed since, it still was this
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(4999))
    with pytest.raises(files.DiskSpaceError) as error:
        fails(RuntimeError("unexpected pos 576 vs 534"))
    assert str(error.value) == (f"{tmp_path}: the disk is full: writing optimizer.pt failed (unexpected pos 576 vs "
                                "534); about 5,000 bytes are needed there, 4,999 are free; free some space")
    with pytest.raises(KeyboardInterrupt):  # not a failed write
        fails(KeyboardInterrupt())


def test_publish_folder_keeps_a_same_build_finished_first_and_replaces_a_stale_one(tmp_path):
    final = tmp_path / "built"

    def staged(content: str) -> Path:
        folder = tmp_path / f"staging-{content}"
        folder.mkdir()
        (folder / "settings").write_text(content)
        return folder

    def same_as(content):
        return lambda folder: (folder / "settings").read_text() == content

    files.publish_folder(staged("a"), final, same_as("a"))
    first_inode = (final / "settings").stat().st_ino
    files.publish_folder(staged("a2"), final, lambda folder: True)  # another process's identical build: kept
    assert (final / "settings").read_text() == "a" and (final / "settings").stat().st_ino == first_inode
    files.publish_folder(staged("b"), final, same_as("b"))  # settings changed: the stale folder is replaced
    assert (final / "settings").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # no staging folder left behind


HOLD_A_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_staging_leftovers_of_dead_writers_are_removed_and_those_of_live_writers_kept(tmp_path):
    """A killed writer's lock went with it: its leftover goes. A writer at work holds its entry's lock, in this
    process or in another (a run sharing the folder): its entry stays, until that writer dies."""
    final = tmp_path / "sharegpt.jsonl"
    dead_file, dead_folder, other_writer = (tmp_path / f".sharegpt.jsonl.partial-{name}"
                                            for name in ("k1ll3d", "d1r3ct", "0th3r"))
    dead_file.write_text('{"id": "cut sh')
    dead_folder.mkdir()
    (dead_folder / "data").write_text("half")
    other_writer.write_text("")
    unrelated = tmp_path / ".other.jsonl.partial-k1ll3d"  # another file's staging: not ours to judge
    unrelated.write_text("")
    writer = subprocess.Popen([sys.executable, "-c", HOLD_A_LOCK, str(other_writer)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline() == "locked\n"
        with files.staging(final, folder=False) as ours:
            assert ours.name.startswith(".sharegpt.jsonl.partial-") and ours.is_file()
            assert sorted(files.remove_dead_staging(final)) == sorted([dead_file, dead_folder])
            assert sorted(tmp_path.iterdir()) == sorted([ours, other_writer, unrelated])
            ours.write_text("{}\n")
            os.replace(ours, final)
        assert files.remove_dead_staging(final) == []  # the other writer is still at work
    finally:
        writer.kill()
        writer.wait()
    assert files.remove_dead_staging(final) == [other_writer]  # killed: what it left goes
    assert sorted(tmp_path.iterdir()) == [unrelated, final] and final.read_text() == "{}\n"


def test_a_staging_entry_is_removed_when_its_writer_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with files.staging(tmp_path / "built", folder=True) as folder:
            (folder / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
