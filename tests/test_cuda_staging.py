"""BatchForward's CUDA staging (pipeline/extraction/backbone.py, `_CudaStaging`), its bookkeeping run on
the CPU: CUDA's streams, events and pinned memory replaced by stand-ins that do their work at once.
What this cannot show, the copies overlapping the forward on a device, `bench/gpu.py` measures there,
and compares the device's features with the CPU's."""
import contextlib

import numpy as np
import pytest
import torch

from pipeline.extraction import backbone
from pipeline.extraction.backbone import BatchForward
from pipeline.extraction.mfnet import random_mfnet
from pipeline.extraction.settings import ExtractSettings
from pipeline.extraction.video import Preprocess, Sampling


class Event:
    def __init__(self, blocking=False):
        self.blocking, self.recorded, self.waited = blocking, 0, 0

    def record(self, stream=None):
        self.recorded += 1

    def synchronize(self):
        self.waited += 1


class Stream:
    def __init__(self, device=None):
        self.waited_for = 0

    def wait_stream(self, other):
        self.waited_for += 1


@pytest.fixture
def staged(monkeypatch):
    """A BatchForward on the CPU that goes through the CUDA staging."""
    for name, value in (("Stream", Stream), ("Event", Event), ("stream", lambda s: contextlib.nullcontext()),
                        ("current_stream", lambda device=None: Stream())):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    allocated = []
    monkeypatch.setattr(backbone, "_pinned", lambda n: allocated.append(n) or torch.empty(n, dtype=torch.uint8))
    settings = ExtractSettings(sampling=Sampling(clips=2, frames=4), preprocess=Preprocess(resize=40, crop=32))
    forward = BatchForward(random_mfnet(0).eval(), torch.device("cpu"), settings, channels_last=False)
    forward.staging = backbone._CudaStaging(forward)
    forward.allocated = allocated
    return forward


def test_staged_batches_reach_their_rows_when_waited_for_equal_to_one_batch_at_once(staged):
    rng = np.random.default_rng(0)
    sizes = [2, 3, 1, 4]                                         # clips a batch
    clips = rng.integers(0, 256, (sum(sizes), 4, 32, 32, 3), dtype=np.uint8)
    out = np.full((sum(sizes), 768, 2, 1, 1), np.nan, np.float32)
    edges = np.cumsum([0] + sizes)
    rows = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    filled = lambda: [not np.isnan(out[r]).any() for r in rows]  # noqa: E731

    for r in rows[:3]:                            # each batch given as one-clip pieces, as extract does
        staged.submit([clips[i:i + 1] for i in range(r.start, r.stop)], out[r])
    # two batches in flight: the third needed the first one's buffers, so the first was collected
    assert staged.submitted == 3 and filled() == [True, False, False, False]
    staged.wait(2)
    assert filled() == [True, True, False, False]
    staged.submit([clips[rows[3]]], out[rows[3]])   # 4 clips in buffers that held 3: they grow
    staged.wait()
    assert filled() == [True] * 4
    for r in rows:                                # the same numbers as the batch computed at once
        assert np.array_equal(out[r], staged(clips[r]))
    # pinned buffers made for the first two batches (clips, maps) and grown once for the fourth;
    # the third reused the first's
    clip, row = 4 * 32 * 32 * 3, 768 * 2 * 4
    assert staged.allocated == [2 * clip, 2 * row, 3 * clip, 3 * row, 4 * clip, 4 * row]
    # every batch waited for exactly once, after its event was recorded; the host sleeps while it waits
    events = [b.done for b in staged.staging.free]
    assert sorted((e.recorded, e.waited, e.blocking) for e in events) == [(2, 2, True), (2, 2, True)]
    assert not staged.staging.busy


def test_a_batch_that_fails_leaves_the_staging_usable_with_fresh_buffers(staged):
    clips = np.zeros((2, 4, 32, 32, 3), np.uint8)
    out = np.zeros((2, 768, 2, 1, 1), np.float32)
    with pytest.raises(ValueError):        # pieces of another frame count: the copy into the batch fails
        staged.submit([clips[:1], np.zeros((1, 5, 32, 32, 3), np.uint8)], out)
    assert len(staged.staging.free) == 2 and not staged.staging.busy
    for _ in range(3):
        staged.submit([clips], out)
    staged.wait()
    assert np.array_equal(out, staged(clips))
