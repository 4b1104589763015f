"""Atomic outputs: a writer killed outright leaves its temporary file; the next writer of that output removes it
when its process is dead, and leaves a live writer's (or another host's) alone."""

import os
import subprocess
import sys

from nosasim.atomic import _owner, atomic_folder, atomic_write


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it now (pids are not reused this quickly)


def test_dead_writers_leftovers_are_removed(tmp_path):
    host = _owner().rsplit("-", 1)[0]
    dead = tmp_path / f".out.json.{host}-{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".out.json.{host}-{os.getpid()}.def456.tmp"  # this process: alive, maybe mid-write
    other = tmp_path / ".out.json.otherhost-1.ghi789.tmp"  # another machine's writer on a shared disk
    unrelated = tmp_path / f".other.json.{host}-{_dead_pid()}.jkl.tmp"  # another output's: not ours to judge
    for p in (dead, live, other, unrelated):
        p.write_text("partial")
    atomic_write(tmp_path / "out.json", b"{}")
    assert (tmp_path / "out.json").read_bytes() == b"{}"
    assert not dead.exists()
    assert live.exists() and other.exists() and unrelated.exists()


def test_dead_writers_folder_is_removed(tmp_path):
    host = _owner().rsplit("-", 1)[0]
    dead = tmp_path / f".sweep.{host}-{_dead_pid()}.x1.tmp"
    dead.mkdir()
    (dead / "points.csv").write_text("partial")
    with atomic_folder(tmp_path / "sweep") as tmp:
        (tmp / "points.csv").write_text("whole")
    assert (tmp_path / "sweep" / "points.csv").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
