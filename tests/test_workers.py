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
from pipeline.extraction.extractor import write_part
from pipeline.extraction.workers import DIED, WorkerError, Workers, _decode_into
from pipeline.extraction.settings import ExtractSettings
from pipeline.extraction.video import Preprocess, Sampling

SETTINGS = ExtractSettings(sampling=Sampling(clips=2, frames=4), preprocess=Preprocess(resize=40, crop=32))
MAPS = (768, 2, 1, 1)            # MFNet's clip map at 4 frames of 32 x 32
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


def decoded(d: Workers, entries) -> list:
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
    d = Workers(0, SETTINGS, 0, MAPS)
    try:
        return decoded(d, entries)
    finally:
        d.close()


def test_processes_decode_the_same_clips_as_this_process_and_record_the_same_failure(entries, inline):
    assert [r for _, r in inline].count("") == 8 and inline[-1][0] is None and inline[-1][1]   # c_2 is garbage
    d = Workers(2, SETTINGS, len(entries), MAPS)
    try:
        assert same(decoded(d, entries), inline)
        assert same(decoded(d, entries), inline)          # the slots, used again
        assert len(d.free) == 2 * len(entries)
    finally:
        d.close()
    assert not [n for n in os.listdir("/dev/shm") if n in {s.name for s in d.slots}]


def test_a_decoder_killed_mid_part_loses_nothing(entries, inline):
    d = Workers(2, SETTINGS, len(entries), MAPS)
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
    d = Workers(2, SETTINGS, len(entries), MAPS, decode=die_on_b1)
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
                      "from pipeline.extraction.workers import Workers\n"
                      "from pipeline.extraction.settings import ExtractSettings\n"
                      "Workers(1, ExtractSettings(), 1, (768, 8, 4, 4))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert WorkerError.__name__ in r.stderr and "if __name__ == '__main__':" in r.stderr and "--workers 0" in r.stderr
    assert "leaked shared_memory" not in r.stderr                  # the slots unlinked though the pool never started


def small_dataset(tmp_path) -> list[str]:
    """20 videos in 5 classes, and the extract command (part by part, 2 workers) for them."""
    root = tmp_path / "data"
    for ci, c in enumerate("abcde"):
        for i in range(4):
            write_video(root / c / f"{c}_{i}.avi", 30 + i, start=5 + 20 * ci + 4 * i)
    split = tmp_path / "split"
    split.mkdir()
    for part, cs in (("train", "abc"), ("val", "d"), ("test", "e")):
        (split / f"{part}_classes.txt").write_text("\n".join(cs) + "\n")
    return [sys.executable, "-m", "pipeline", "extract", "--root", str(root), "--split", str(split), "--out",
            str(tmp_path / "c.h5"), "--clips", "2", "--frames", "8", "--resize", "64", "--crop", "64", "--part-size",
            "1", "--workers", "2", "--batch-size", "2"]


def started(cmd, parts: Path) -> subprocess.Popen:
    """The command, in a process group of its own (as a terminal's job), once it has written a part."""
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(parts.glob("part-*.h5")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the extraction ended before it could be stopped"
    return p


def none_left(pgid: int, within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _group_alive(pgid)


def resumed(cmd, tmp_path) -> None:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "c.h5") as f:
        assert len(f["videos/id"]) == 20


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_every_process_and_a_rerun_resumes(tmp_path, stop):
    cmd, parts = small_dataset(tmp_path), tmp_path / "c.h5.parts"
    p = started(cmd, parts)
    os.killpg(p.pid, stop)          # Ctrl-C, or Slurm's time limit: the whole group
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert "leaked" not in err                                     # the shared memory was unlinked
    assert none_left(p.pid), "a worker process outlived Ctrl-C"
    done = len(list(parts.glob("part-*.h5")))
    assert 1 <= done < 20 and not list(parts.glob("*.tmp*"))
    resumed(cmd, tmp_path)


def test_workers_end_when_the_run_is_killed_and_a_rerun_resumes(tmp_path):
    """kill -9 (or the OOM killer) on the run's own process: its workers and merging process must not
    wait for tasks forever, holding the shared memory and the cache's lock."""
    cmd, parts = small_dataset(tmp_path), tmp_path / "c.h5.parts"
    p = started(cmd, parts)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert none_left(p.pid), "a worker process outlived the run"
    resumed(cmd, tmp_path)


def _group_alive(pgid: int) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == pgid and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
                    return True
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                pass
    return False


def test_a_shared_memory_too_small_for_the_slots_and_buffers_is_one_line_naming_the_fixes(monkeypatch):
    import pipeline.extraction.workers as workers

    class Small:
        f_bavail, f_frsize = 16, 4096                      # 64 KB free
    monkeypatch.setattr(workers.os, "statvfs", lambda where: Small())
    with pytest.raises(WorkerError, match=r"/dev/shm has 65.5 KB free, and the worker processes need 688.1 KB .*"
                                           r"--shm-size.*--part-size.*--workers 0"):
        Workers(1, SETTINGS, 8, MAPS)    # 16 slots of 2 x 4 x 32 x 32 x 3 bytes, 3 buffers of 16 x 1,536 float32


def test_a_run_refused_before_it_starts_leaves_nothing_that_blocks_the_next(entries, tmp_path, monkeypatch):
    import pipeline.extraction.workers as workers
    from pipeline.errors import ConfigError

    class Small:
        f_bavail, f_frsize = 16, 4096
    real = os.statvfs
    with monkeypatch.context() as m:
        m.setattr(workers.os, "statvfs", lambda where: Small() if where == "/dev/shm" else real(where))
        with pytest.raises(WorkerError, match="/dev/shm"):
            extract_with(entries, tmp_path / "c.h5", 1)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            extract_with(entries, tmp_path / "c.h5", 1, device="cuda")
    assert os.listdir(tmp_path) == []        # no parts folder, no lock, no temporary


def extract_with(entries, out, workers: int, backbone=None, **kw) -> dict:
    import warnings
    from pipeline.extraction.backbone import Backbone
    from pipeline.extraction.extractor import extract_features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # the random network's warning
        return extract_features(entries, out, SETTINGS, backbone or Backbone.load(None, 0), batch_size=3,
                                workers=workers, part_size=2, progress=False, **kw)


def cache_values(path) -> dict:
    with h5py.File(path) as f:
        return {"content_digest": f.attrs["content_digest"], **{k: f[k][:] for k in ("features", "pooled", "steps")},
                **{f"videos/{k}": f[f"videos/{k}"][:] for k in ("id", "status", "reason", "digest")}}


@pytest.fixture(scope="module")
def written_here(entries, tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "c.h5"
    extract_with(entries, out, 0)
    return cache_values(out)


def same_cache(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_parts_written_by_workers_are_those_written_here_bit_for_bit(entries, written_here, tmp_path):
    assert written_here["videos/status"].tolist().count(b"failed") == 1          # c_2 is garbage
    before = set(os.listdir("/dev/shm"))
    r = extract_with(entries, tmp_path / "c.h5", 2)
    assert set(os.listdir("/dev/shm")) <= before                                   # slots and buffers unlinked
    assert r["failures"] == [("c/c_2", written_here["videos/reason"][-1].decode())]
    assert same_cache(cache_values(tmp_path / "c.h5"), written_here)


WRITTEN_BY_THE_PARENT = []


def die_writing_part_1(maps, path, *args):
    """A writer that dies on one part (as the OOM killer would take it); written by the parent, it works."""
    import multiprocessing
    if multiprocessing.parent_process() is None:
        WRITTEN_BY_THE_PARENT.append(Path(path).name)
    elif Path(path).name == "part-000001.h5":
        os.kill(os.getpid(), signal.SIGKILL)
    return write_part(maps, path, *args)    # the real one: imported before the test replaced it


def test_a_writer_killed_mid_part_loses_nothing(entries, written_here, tmp_path, monkeypatch):
    import pipeline.extraction.extractor as extractor
    monkeypatch.setattr(extractor, "write_part", die_writing_part_1)
    extract_with(entries, tmp_path / "c.h5", 2)
    # part 1 by this process, and any other part in the broken pool then; the last ones by fresh workers
    assert "part-000001.h5" in WRITTEN_BY_THE_PARENT and "part-000004.h5" not in WRITTEN_BY_THE_PARENT
    assert same_cache(cache_values(tmp_path / "c.h5"), written_here)
    assert not (tmp_path / "c.h5.parts").exists()


class LateForward:
    """A device's way of answering (as BatchForward on CUDA): a batch's maps reach `out` only when
    `wait` covers it, and `out` holds NaN until then, so a part written before its maps arrived
    would be recorded as failed (non-finite) and the caches would differ."""
    on_cpu = False

    def __init__(self, forward):
        self.forward, self.submitted, self.queued, self.waits = forward, 0, [], []

    def __call__(self, clips):
        return self.forward(clips)

    def submit(self, pieces, out):
        self.submitted += 1
        out[...] = np.nan
        self.queued.append((self.submitted, out, self.forward(np.concatenate(pieces))))

    def wait(self, upto=None):
        upto = self.submitted if upto is None else upto
        self.waits.append((upto, self.submitted))
        for number, out, maps in [q for q in self.queued if q[0] <= upto]:
            out[...] = maps
        self.queued = [q for q in self.queued if q[0] > upto]


@pytest.mark.parametrize("workers", [0, 2])
def test_maps_that_reach_the_host_late_are_waited_for_and_the_device_is_never_drained_mid_run(
        entries, written_here, tmp_path, workers):
    from pipeline.extraction.backbone import Backbone

    class Late(Backbone):
        def batch_forward(self, *a):
            self.late = LateForward(super().batch_forward(*a))
            return self.late
    with pytest.warns(UserWarning, match="RANDOMLY"):
        base = Backbone.load(None, 0)
    backbone = Late(base.model, base.weights_path, base.sha256, base.seed)
    extract_with(entries, tmp_path / "c.h5", workers, backbone)
    assert same_cache(cache_values(tmp_path / "c.h5"), written_here)
    # 9 videos in parts of 2, 2 clips a video, batches of 3: 2 batches a part, none for the last (the
    # unreadable video alone). Each part's maps are waited for once the next part's batches are queued
    # (upto, submitted), the last ones at the end
    assert backbone.late.waits == [(2, 4), (4, 6), (6, 8), (8, 8), (8, 8)]


def test_dense_parts_beyond_the_buffers_are_handed_over_whole_and_stored_the_same(tmp_path):
    """Dense sampling: a part of more clips than a buffer holds (16 a video) goes to its writer pickled."""
    import warnings
    from pipeline.extraction.backbone import Backbone
    from pipeline.extraction.extractor import extract_features
    from pipeline.extraction.workers import Workers as W
    root = tmp_path / "data"
    write_video(root / "a" / "long.avi", 76, start=3)        # 19 clips of 4 frames: more than the buffer's 16
    write_video(root / "b" / "short.avi", 12, start=90)      # 3 clips: in the buffer
    write_video(root / "c" / "short.avi", 13, start=130)
    split = tmp_path / "split"
    split.mkdir()
    for part, cs in (("train", "a"), ("val", "b"), ("test", "c")):
        (split / f"{part}_classes.txt").write_text(cs + "\n")
    entries = resolve(load_split(split), root)[0]
    s = ExtractSettings(Sampling("dense", frames=4, step=1), Preprocess(resize=40, crop=32))
    assert W(0, s, 1, MAPS).part_rows == 16
    caches = []
    for workers in (0, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extract_features(entries, tmp_path / f"{workers}.h5", s, Backbone.load(None, 0), batch_size=4,
                             workers=workers, part_size=1, progress=False)
        caches.append(cache_values(tmp_path / f"{workers}.h5"))
    assert caches[0]["features"].shape[0] == 19 + 3 + 4        # 13 frames: starts 0, 4, 8 and 9 (flush with the end)
    assert same_cache(*caches)


MERGED_HERE = []


def die_merging_part_2(part):
    """The merging process dies at the third part (as the OOM killer would take it)."""
    from pipeline.extraction.workers import _merge_add
    if Path(part).name == "part-000002.h5":
        os.kill(os.getpid(), signal.SIGKILL)
    return _merge_add(part)


def test_a_merging_process_killed_mid_cache_loses_nothing(entries, written_here, tmp_path, monkeypatch):
    import pipeline.extraction.workers as workers
    real = workers.Appender

    class Recorded(real):           # the parts appended in this process: all of them, again
        def add(self, part):
            MERGED_HERE.append(Path(part).name)
            return super().add(part)
    monkeypatch.setattr(workers, "_merge_add", die_merging_part_2)
    monkeypatch.setattr(workers, "Appender", Recorded)
    extract_with(entries, tmp_path / "c.h5", 2)
    assert MERGED_HERE == [f"part-{k:06d}.h5" for k in range(5)]
    assert same_cache(cache_values(tmp_path / "c.h5"), written_here)
