"""Atomic writes and output locks."""
import os

import pytest

from conftest import cli
from pipeline.files import LockError, atomic_path, atomic_write_text, exclusive


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    f = tmp_path / "a.txt"
    atomic_write_text(f, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_path(f, suffix=".npz") as tmp:
        assert tmp.name == "a.txt.tmp.npz"
        tmp.write_text("new")
    assert f.read_text() == "new"


def test_a_second_writer_is_refused_at_once_with_the_holder_named(tmp_path, trained):
    with exclusive(tmp_path / "run", "run folder"):
        with exclusive(tmp_path / "run", "run folder"):     # this process holds it: re-entered
            pass
        r = cli("train", "--cache", str(trained / "c.h5"), "--out", str(tmp_path / "run"), "--head", "mean",
                "--n-way", "2")
        assert r.returncode == 2 and f"another process is writing this run folder (pid {os.getpid()}" in r.stderr
        r = cli("extract", "--root", str(trained / "data"), "--split", str(trained / "split"), "--out",
                str(tmp_path / "run"), "--workers", "0")
        assert r.returncode == 2 and "another process is writing this feature cache" in r.stderr
    with exclusive(tmp_path / "run", "run folder"):      # released: the next holder gets it
        assert (tmp_path / "run.lock").exists()
    assert not (tmp_path / "run.lock").exists()          # removed by its holder: no file outlives a run
