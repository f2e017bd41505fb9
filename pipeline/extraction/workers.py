"""Worker processes that decode videos and write parts, the data crossing through shared memory.

Why processes: decoding threads stopped scaling at 2-4 threads on a 16-core GPU server (the Python
between OpenCV calls, and the main process's own work, hold the GIL). Why shared memory: pickling a
video's 1.8 MB of clips through a pipe cost more than decoding it. The parent maps a ring of slots,
one video each, once; a worker decodes into the slot it is given and the parent reads the clips in
place until the part's batches are built (`Part.release`). Slots are reused, because a fresh block
per video cost 5 ms a video in page faults here. A video larger than a slot (dense sampling of a
long video) comes back through the pipe instead.

The same processes write the part files: the network's float32 maps go into a shared-memory buffer
(one per part in flight), and a worker casts, pools, checks, hashes, compresses and writes them.
In this process the writing held the GIL (h5py keeps it through its filters): on a 16-core GPU
machine it was the bound of the whole extraction.

The parts are appended to the cache, in order, by one more process (`Merger`), so that this process
is left to feed the network.

A worker that dies (a crash inside FFmpeg, the OOM killer, kill -9) breaks the pool: the videos it
was reading are decoded again one at a time in a fresh process, so a video that kills its decoder
every time is recorded as failed, and one lost to a passing kill is decoded as usual; a part whose
writer died is written by this process from the same buffer, and a cache whose merging process died
is merged again here from the parts.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np

from ..errors import PipelineError
from ..files import readable_size
from ..store import Appender
from .settings import ExtractSettings
from .video import VideoClips, read_clips_or_reason, view_seed


class WorkerError(PipelineError):
    pass


DIED = "its decoding process died while reading it (a crash in the decoder, or killed); decoded again alone, it died again"

_slots: list[SharedMemory] = []    # in a worker: the parent's decoding slots, mapped once
_buffers: dict[str, SharedMemory] = {}   # in a worker: the parent's map buffers, mapped at first use


def _worker_init(run: int, names: list[str]) -> None:
    _serve(run)
    cv2.setNumThreads(1)                           # one process per core already
    _slots[:] = [SharedMemory(n) for n in names]


def _serve(run: int) -> None:
    """A worker's start: Ctrl-C is the run's to handle (it stops the workers), and the worker ends
    itself once the run's process `run` is gone (kill -9, the OOM killer): it would otherwise wait
    for tasks forever, holding the shared memory and the cache's HDF5 lock."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while True:
            time.sleep(0.5)
            try:
                os.kill(run, 0)
                with open(f"/proc/{run}/stat") as f:
                    gone = f.read().rsplit(")", 1)[1].split()[0] == "Z"   # killed, not yet reaped
            except ProcessLookupError:
                gone = True
            except OSError:      # no /proc (not Linux): the pid's existence decides
                gone = False
            if gone:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _pool(processes: int, init, *args) -> ProcessPoolExecutor:
    """Processes forked from the forkserver (a clean process, not this one with its torch and OpenCV
    thread pools, which a fork leaves broken), each started by `init(this process's pid, *args)`."""
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("forkserver"), initializer=init,
                               initargs=(os.getpid(), *args))


_appender: list[Appender] = []       # in the merging process: the cache it appends to


def _merge_start(path, settings: dict, expect: dict) -> None:
    _appender[:] = [Appender(path, settings, expect).__enter__()]


def _merge_add(part) -> None:
    _appender[0].add(part)


def _merge_end() -> None:
    _appender.pop().__exit__(None, None, None)


def _write_from(fn, name: str, shape: tuple, spans: list, args: tuple):
    """In a worker: `fn(maps, *args)`, each video's maps a view of the parent's buffer `name`."""
    if name not in _buffers:
        _buffers[name] = SharedMemory(name)
    buf = np.ndarray(shape, np.float32, buffer=_buffers[name].buf)
    return fn(maps_of(buf, spans), *args)


def maps_of(buf: np.ndarray, spans: list) -> list:
    """Each video's rows of a part's maps, from its (first row, rows) span; None for a failed video."""
    return [buf[a:a + n] if n else None for a, n in spans]


def _decode_into(slot: int, args: tuple) -> tuple:
    """In a worker: decode one video, its uint8 clips into `slot` when they fit (else pickled back)."""
    vc, reason = read_clips_or_reason(*args)
    if vc is None or vc.clips.nbytes > _slots[slot].size:
        return vc, reason
    np.ndarray(vc.clips.shape, vc.clips.dtype, buffer=_slots[slot].buf)[...] = vc.clips
    return replace(vc, clips=vc.clips.shape), ""


def check_shared_memory(need: int, where: str = "/dev/shm") -> None:
    """Refuses slots that do not fit: a worker writing past a full /dev/shm dies of SIGBUS, and
    every video would be recorded as failed. Docker gives containers 64 MB unless told more."""
    try:
        st = os.statvfs(where)
    except OSError:
        return                      # no /dev/shm to ask (not Linux): the OS will say
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise WorkerError(f"{where} has {readable_size(free)} free, and the worker processes need {readable_size(need)} "
                          "for the clips and maps of the parts in flight: give the container more (docker run "
                          "--shm-size=1g), or lower --part-size, or work in the main process with --workers 0")


class Part:
    """The decoding of one part's videos: `result()` gives [(VideoClips | None, reason)] in order,
    each video's clips a view of its slot until `release()`."""

    def __init__(self, workers: "Workers", tasks: list[tuple[int, tuple]], futures: list[Future]):
        self.workers, self.tasks, self.futures = workers, tasks, futures

    def result(self) -> list[tuple[VideoClips | None, str]]:
        out = []
        for (slot, args), f in zip(self.tasks, self.futures):
            try:
                vc, reason = f.result()
            except BrokenProcessPool:
                vc, reason = self.workers.retry_alone(slot, args)
            if vc is not None and isinstance(vc.clips, tuple):
                vc = replace(vc, clips=np.ndarray(vc.clips, np.uint8, buffer=self.workers.slots[slot].buf))
            out.append((vc, reason))
        return out

    def release(self) -> None:
        """Gives the slots back; the clips must not be used after."""
        self.workers.free.extend(slot for slot, _ in self.tasks if slot >= 0)
        self.tasks = []


class Written:
    """One part's write: `result()` gives what the writing function returned (the part written by
    this process from the same buffer if its worker died), and frees the buffer."""

    def __init__(self, workers: "Workers", future: Future, fn, buffer: int, maps: list, args: tuple):
        self.workers, self.future, self.fn, self.buffer, self.maps, self.args = workers, future, fn, buffer, maps, args

    def result(self):
        try:
            return self.future.result()
        except BrokenProcessPool:
            return self.fn(self.maps, *self.args)
        finally:
            self.maps = None
            if self.buffer >= 0:
                self.workers.free_buffers.append(self.buffer)
                self.buffer = -1


class Workers:
    """`workers` processes (inline in this process when 0) that decode parts of `part_size` videos,
    into slots for two parts, and write parts from buffers of the network's maps, `map_shape` a clip
    (`in_flight` of them, so that writing keeps up with a GPU: a part's write costs about a fifth of
    its decoding).
    `decode` is what a worker runs for a video: `_decode_into`, or a module-level function that
    calls it (a test's, to crash a worker on purpose)."""

    def __init__(self, workers: int, settings: ExtractSettings, part_size: int, map_shape: tuple,
                 decode=_decode_into):
        self.workers, self.settings, self.map_shape, self.decode = workers, settings, tuple(map_shape), decode
        s = settings.sampling
        clips = s.clips if s.mode == "segments" else 16       # dense: longer videos come through the pipe
        self.part_rows = part_size * settings.views * clips    # the clips of a part that fit in the buffers
        self.slots: list[SharedMemory] = []
        self.free: list[int] = []
        self.buffers: list[SharedMemory] = []
        self.free_buffers: list[int] = []
        self.in_flight = 2 + -(-workers // 4) if workers else 2
        self.pool = self.thread = None
        if workers == 0:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="write")
            return
        slot = settings.views * clips * s.frames * settings.preprocess.crop ** 2 * 3
        buffer = self.part_rows * int(np.prod(map_shape)) * 4
        check_shared_memory(2 * part_size * slot + self.in_flight * buffer)
        try:
            self.slots = [SharedMemory(create=True, size=slot) for _ in range(2 * part_size)]
            self.buffers = [SharedMemory(create=True, size=buffer) for _ in range(self.in_flight)]
            self.free, self.free_buffers = list(range(2 * part_size)), list(range(self.in_flight))
            self.pool = self._new_pool()
        except BaseException:
            self.close()
            raise

    def _new_pool(self, workers: int | None = None) -> ProcessPoolExecutor:
        """A pool that has shown it can start a worker."""
        pool = _pool(workers or self.workers, _worker_init, [s.name for s in self.slots])
        try:
            pool.submit(os.getpid).result()
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise WorkerError("the worker processes could not start. Called from a Python script, the call must "
                              "sit under `if __name__ == '__main__':` (each process imports the script again); "
                              "or work in this process with workers=0 (--workers 0)") from None
        return pool

    def _submit(self, fn, *args) -> Future:
        if self.pool is None:
            self.pool = self._new_pool()
        try:
            return self.pool.submit(fn, *args)
        except BrokenProcessPool:            # a worker died since the last submit: a fresh pool
            self._terminate()
            self.pool = self._new_pool()
            return self.pool.submit(fn, *args)

    def submit(self, entries) -> Part:
        """Decodes these videos (one part): the clips come back in shared-memory slots."""
        s = self.settings
        args = [(e.path, s.sampling, s.preprocess, s.views, view_seed(e.id, s.seed), s.flip) for e in entries]
        if self.workers == 0:
            futures = [Future() for _ in args]
            for f, a in zip(futures, args):
                f.set_result(read_clips_or_reason(*a))
            return Part(self, [(-1, a) for a in args], futures)
        if len(self.free) < len(args):
            raise RuntimeError("more videos in flight than decoding slots")   # a bug, not an input
        tasks = [(self.free.pop(), a) for a in args]
        return Part(self, tasks, [self._submit(self.decode, slot, a) for slot, a in tasks])

    def out(self, rows: int) -> tuple[np.ndarray, int]:
        """(float32 (rows, *map_shape) array for one part's maps, its buffer): a shared-memory buffer that
        the workers read in place, or (dense sampling beyond the buffers, or no workers) a private
        array (buffer -1). At most `in_flight` parts may hold one: `write(...).result()` frees it."""
        if self.workers == 0 or rows > self.part_rows:
            return np.empty((rows, *self.map_shape), np.float32), -1
        if not self.free_buffers:
            raise RuntimeError("more parts in flight than map buffers")     # a bug, not an input
        b = self.free_buffers.pop()
        return np.ndarray((rows, *self.map_shape), np.float32, buffer=self.buffers[b].buf), b

    def write(self, fn, maps: np.ndarray, buffer: int, spans: list, *args) -> Written:
        """`fn(each video's maps, *args)` in a worker (a thread when there are none); `maps`, `buffer`
        from `out`, `spans` each video's (first row, rows). `fn` must be a module-level function."""
        views = maps_of(maps, spans)
        if self.workers == 0:
            future = self.thread.submit(fn, views, *args)
        elif buffer < 0:             # a private array: pickled to the worker
            future = self._submit(fn, views, *args)
        else:
            future = self._submit(_write_from, fn, self.buffers[buffer].name, maps.shape, spans, args)
        return Written(self, future, fn, buffer, views, args)

    def retry_alone(self, slot: int, args: tuple) -> tuple:
        """After a worker died: this video alone in a fresh one-process pool (the broken pool is
        renewed at the next submit)."""
        self._terminate()
        alone = self._new_pool(1)
        try:
            return alone.submit(self.decode, slot, args).result()
        except BrokenProcessPool:
            return None, DIED
        finally:
            alone.shutdown(wait=True)

    def _terminate(self) -> None:
        stop(self.pool)
        self.pool = None

    def close(self) -> None:
        self._terminate()
        if self.thread is not None:
            self.thread.shutdown(wait=True, cancel_futures=True)
        for shm in self.slots + self.buffers:
            try:
                shm.close()
            except BufferError:     # a view still alive: the mapping goes with it
                pass
            shm.unlink()
        self.slots, self.buffers = [], []


def stop(pool: ProcessPoolExecutor | None) -> None:
    """Stops a pool's processes now (Ctrl-C, a dead sibling): shutdown alone waits for the videos
    they are decoding."""
    if pool is None:
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join()


class Merger:
    """Appends finished part files to a new cache at `path`, in the order given: in a process of its
    own (`store.Appender` there) when `in_process`, else here. `add` returns at once; `close` waits
    for the last and raises what went wrong. If that process dies, the parts are merged again here."""

    def __init__(self, path, settings: dict, expect: dict[int, str], in_process: bool = True):
        self.args, self.parts, self.futures, self.pool, self.here = (path, settings, expect), [], [], None, None
        if in_process:
            self.pool = _pool(1, _serve)
            self._submit(_merge_start, *self.args)
        else:
            self.here = Appender(*self.args).__enter__()

    def _submit(self, fn, *args) -> None:
        try:
            self.futures.append(self.pool.submit(fn, *args))
        except BrokenProcessPool as e:        # it died: close() merges here
            self.futures.append(Future())
            self.futures[-1].set_exception(e)

    def add(self, part) -> None:
        self.parts.append(part)
        if self.here is not None:
            return self.here.add(part)
        self._submit(_merge_add, part)
        while self.futures and self.futures[0].done():
            error = self.futures.pop(0).exception()
            if error is not None and not isinstance(error, BrokenProcessPool):
                raise error                    # a refused part stops the run now, not at the end

    def close(self) -> None:
        if self.here is not None:
            self.here, here = None, self.here
            return here.__exit__(None, None, None)
        self._submit(_merge_end)
        try:
            for f in self.futures:
                f.result()
        except BrokenProcessPool:
            with Appender(*self.args) as here:
                for part in self.parts:
                    here.add(part)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stops merging (the cache being made is left as it is: the caller removes it)."""
        stop(self.pool)
        if self.here is not None and self.here.writer is not None:
            self.here.writer.close()
        self.here = None
