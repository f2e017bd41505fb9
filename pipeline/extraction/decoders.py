"""Decoding videos in worker processes that hand their clips back through shared memory.

Why processes: decoding threads stopped scaling at 2-4 threads on a 16-core GPU server (the Python
between OpenCV calls, and the main process's own work, hold the GIL). Why shared memory: pickling a
video's 1.8 MB of clips through a pipe cost more than decoding it. The parent maps a ring of slots,
one video each, once; a worker decodes into the slot it is given and the parent reads the clips in
place until the part's batches are built (`Part.release`). Slots are reused, because a fresh block
per video cost 5 ms a video in page faults here. A video larger than a slot (dense sampling of a
long video) comes back through the pipe instead.

A decoder that dies (a crash inside FFmpeg, the OOM killer, kill -9) breaks the pool: the videos it
was reading are decoded again one at a time in a fresh process, so a video that kills its decoder
every time is recorded as failed, and one lost to a passing kill is decoded as usual.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np

from ..errors import PipelineError
from ..files import readable_size
from .settings import ExtractSettings
from .video import VideoClips, read_clips_or_reason, view_seed


class DecoderError(PipelineError):
    pass


DIED = "its decoding process died while reading it (a crash in the decoder, or killed); decoded again alone, it died again"

_slots: list[SharedMemory] = []    # in a worker: the parent's slots, mapped once


def _worker_init(names: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle: it stops the workers
    cv2.setNumThreads(1)                           # one process per core already
    _slots[:] = [SharedMemory(n) for n in names]


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
        raise DecoderError(f"{where} has {readable_size(free)} free, and the decoding processes need {readable_size(need)} "
                           "for two parts of clips: give the container more (docker run --shm-size=1g), or lower "
                           "--part-size, or decode in the main process with --workers 0")


class Part:
    """The decoding of one part's videos: `result()` gives [(VideoClips | None, reason)] in order,
    each video's clips a view of its slot until `release()`."""

    def __init__(self, decoders: "Decoders", tasks: list[tuple[int, tuple]], futures: list[Future]):
        self.decoders, self.tasks, self.futures = decoders, tasks, futures

    def result(self) -> list[tuple[VideoClips | None, str]]:
        out = []
        for (slot, args), f in zip(self.tasks, self.futures):
            try:
                vc, reason = f.result()
            except BrokenProcessPool:
                vc, reason = self.decoders.retry_alone(slot, args)
            if vc is not None and isinstance(vc.clips, tuple):
                vc = replace(vc, clips=np.ndarray(vc.clips, np.uint8, buffer=self.decoders.slots[slot].buf))
            out.append((vc, reason))
        return out

    def release(self) -> None:
        """Gives the slots back; the clips must not be used after."""
        self.decoders.free.extend(slot for slot, _ in self.tasks if slot >= 0)
        self.tasks = []


class Decoders:
    """`workers` decoding processes (inline in this process when 0), with slots for `videos` videos.
    `decode` is what a worker runs for a video: `_decode_into`, or a module-level function that
    calls it (a test's, to crash a worker on purpose)."""

    def __init__(self, workers: int, settings: ExtractSettings, videos: int, decode=_decode_into):
        self.workers, self.settings, self.decode = workers, settings, decode
        self.slots: list[SharedMemory] = []
        self.free: list[int] = []
        self.pool = None
        if workers > 0:
            s = settings.sampling
            clips = s.clips if s.mode == "segments" else 16       # dense: longer videos come through the pipe
            size = settings.views * clips * s.frames * settings.preprocess.crop ** 2 * 3
            check_shared_memory(videos * size)
            self.slots = [SharedMemory(create=True, size=size) for _ in range(videos)]
            self.free = list(range(videos))
            self.pool = self._new_pool()

    def _new_pool(self, workers: int | None = None) -> ProcessPoolExecutor:
        """A pool that has shown it can start a worker. Forkserver: decoders forked from a clean process,
        not from this one with its torch and OpenCV thread pools (which a fork leaves broken)."""
        pool = ProcessPoolExecutor(workers or self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_worker_init, initargs=([s.name for s in self.slots],))
        try:
            pool.submit(os.getpid).result()
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise DecoderError("the decoding processes could not start. Called from a Python script, the call must "
                               "sit under `if __name__ == '__main__':` (each process imports the script again); "
                               "or decode in this process with workers=0 (--workers 0)") from None
        return pool

    def submit(self, entries) -> Part:
        s = self.settings
        args = [(e.path, s.sampling, s.preprocess, s.views, view_seed(e.id, s.seed), s.flip) for e in entries]
        if self.workers == 0:
            futures = [Future() for _ in args]
            for f, a in zip(futures, args):
                f.set_result(read_clips_or_reason(*a))
            return Part(self, [(-1, a) for a in args], futures)
        if self.pool is None:
            self.pool = self._new_pool()
        if len(self.free) < len(args):
            raise RuntimeError("more videos in flight than decoding slots")   # a bug, not an input
        tasks = [(self.free.pop(), a) for a in args]
        futures = []
        for slot, a in tasks:
            try:
                futures.append(self.pool.submit(self.decode, slot, a))
            except BrokenProcessPool as e:     # broken before this part: its videos are retried alone
                futures.append(Future())
                futures[-1].set_exception(e)
        return Part(self, tasks, futures)

    def retry_alone(self, slot: int, args: tuple) -> tuple:
        """After a decoder died: this video alone in a fresh one-process pool (the broken pool is
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
        """Stops the pool's workers now (Ctrl-C, a dead sibling): shutdown alone waits for the videos
        they are decoding."""
        if self.pool is None:
            return
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        self.pool = None

    def close(self) -> None:
        self._terminate()
        for shm in self.slots:
            try:
                shm.close()
            except BufferError:     # a view still alive: the mapping goes with it
                pass
            shm.unlink()
        self.slots = []
