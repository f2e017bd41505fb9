"""Decoding in worker processes: the same clips as decoding inline, a killed or crashing decoder
recorded or recovered, Ctrl-C stopping every process, and a script without a main guard told why."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import write_video
from pipeline.extraction.datasets import load_split, resolve
from pipeline.extraction.decoders import DIED, DecoderError, Decoders, _decode_into
from pipeline.extraction.settings import ExtractSettings
from pipeline.extraction.video import Preprocess, Sampling

SETTINGS = ExtractSettings(sampling=Sampling(clips=2, frames=4), preprocess=Preprocess(resize=40, crop=32))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """3 classes x 3 videos of 20-38 frames, one of them garbage."""
    root = tmp_path_factory.mktemp("data")
    for ci, c in enumerate("abc"):
        for i in range(3):
            write_video(root / c / f"{c}_{i}.avi", 20 + 7 * i + ci, start=10 + 40 * ci + 13 * i)
    (root / "c" / "c_2.avi").write_bytes(b"\x00" * 1000)
    split = root.parent / (root.name + "_split")
    split.mkdir()
    for part, cs in (("train", "a"), ("val", "b"), ("test", "c")):
        (split / f"{part}_classes.txt").write_text(cs + "\n")
    return resolve(load_split(split), root)[0]


def decoded(d: Decoders, entries) -> list:
    part = d.submit(entries)
    out = [(None if vc is None else (vc.clips.copy(), vc.indices, vc.n_frames), reason) for vc, reason in part.result()]
    part.release()
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        ra == rb and (x is None) == (y is None) and (x is None or all(np.array_equal(p, q) for p, q in zip(x, y)))
        for (x, ra), (y, rb) in zip(a, b))


@pytest.fixture(scope="module")
def inline(entries):
    d = Decoders(0, SETTINGS, 0)
    try:
        return decoded(d, entries)
    finally:
        d.close()


def test_processes_decode_the_same_clips_as_this_process_and_record_the_same_failure(entries, inline):
    assert [r for _, r in inline].count("") == 8 and inline[-1][0] is None and inline[-1][1]   # c_2 is garbage
    d = Decoders(2, SETTINGS, 2 * len(entries))
    try:
        assert same(decoded(d, entries), inline)
        assert same(decoded(d, entries), inline)          # the slots, used again
        assert len(d.free) == 2 * len(entries)
    finally:
        d.close()
    assert not [n for n in os.listdir("/dev/shm") if n in {s.name for s in d.slots}]


def test_a_decoder_killed_mid_part_loses_nothing(entries, inline):
    d = Decoders(2, SETTINGS, len(entries))
    try:
        part = d.submit(entries)
        os.kill(next(iter(d.pool._processes)), signal.SIGKILL)     # while its videos are in flight
        out = [(None if vc is None else (vc.clips.copy(), vc.indices, vc.n_frames), r) for vc, r in part.result()]
        part.release()
        assert same(out, inline)                          # every video decoded again: none recorded failed
        assert same(decoded(d, entries), inline)          # and the pool renewed
    finally:
        d.close()


def die_on_b1(slot, args):
    """A decoder that crashes on one file, every time (as a decoder bug on a malformed video would)."""
    if Path(args[0]).name == "b_1.avi":
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode_into(slot, args)


def test_a_video_that_kills_its_decoder_every_time_is_recorded_as_failed_and_the_rest_decoded(entries, inline):
    d = Decoders(2, SETTINGS, len(entries), decode=die_on_b1)
    try:
        out = decoded(d, entries)
    finally:
        d.close()
    b1 = [e.id for e in entries].index("b/b_1")
    assert out[b1] == (None, DIED)
    assert same(out[:b1] + out[b1 + 1:], inline[:b1] + inline[b1 + 1:])


def test_a_script_without_a_main_guard_is_told_how_to_call_it(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
                      "from pipeline.extraction.decoders import Decoders\n"
                      "from pipeline.extraction.settings import ExtractSettings\n"
                      "Decoders(1, ExtractSettings(), 1)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert DecoderError.__name__ in r.stderr and "if __name__ == '__main__':" in r.stderr and "--workers 0" in r.stderr


def test_ctrl_c_stops_every_decoder_and_a_rerun_resumes(tmp_path):
    root = tmp_path / "data"
    for ci, c in enumerate("abcde"):
        for i in range(4):
            write_video(root / c / f"{c}_{i}.avi", 30 + i, start=5 + 20 * ci + 4 * i)
    split = tmp_path / "split"
    split.mkdir()
    for part, cs in (("train", "abc"), ("val", "d"), ("test", "e")):
        (split / f"{part}_classes.txt").write_text("\n".join(cs) + "\n")
    out = tmp_path / "c.h5"
    cmd = [sys.executable, "-m", "pipeline", "extract", "--root", str(root), "--split", str(split), "--out", str(out),
           "--clips", "2", "--frames", "8", "--resize", "64", "--crop", "64", "--part-size", "1", "--workers", "2",
           "--batch-size", "2"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)                   # its own process group, as a terminal's job
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + 120
    while not list(parts.glob("part-*.h5")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the extraction ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)                               # what Ctrl-C does: the whole group
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    deadline = time.monotonic() + 30
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(p.pid), "a decoding process outlived Ctrl-C"
    done = len(list(parts.glob("part-*.h5")))
    assert 1 <= done < 20 and not list(parts.glob("*.tmp*"))
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        assert len(f["videos/id"]) == 20


def _group_alive(pgid: int) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == pgid and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
                    return True
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                pass
    return False


def test_a_shared_memory_too_small_for_the_slots_is_one_line_naming_the_fixes(monkeypatch):
    import pipeline.extraction.decoders as decoders

    class Small:
        f_bavail, f_frsize = 16, 4096                      # 64 KB free
    monkeypatch.setattr(decoders.os, "statvfs", lambda where: Small())
    with pytest.raises(DecoderError, match=r"/dev/shm has 65.5 KB free, and the decoding processes need 393.2 KB .*"
                                           r"--shm-size.*--part-size.*--workers 0"):
        Decoders(1, SETTINGS, 16)
