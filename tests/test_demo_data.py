import hashlib

import numpy as np
import pytest

from pipeline.tools import demo_data
from pipeline.extraction.datasets import load_split, resolve
from pipeline.extraction.video import Preprocess, Sampling, read_clips


def test_class_design_has_reversed_pairs_in_every_part():
    cs = demo_data.class_steps()
    assert [len(cs[p]) for p in ("train", "val", "test")] == [10, 8, 6]
    names = [n for p in cs.values() for n in p]
    assert len(set(names)) == 24
    for part, classes in cs.items():
        steps = list(classes.values())
        assert any(s[::-1] in steps for s in steps), part
        assert all(2 <= len(s) <= 3 and len(set(s)) == len(s) for s in steps)
    assert set(cs["test"]) == {"pulse_flicker", "flicker_pulse", "bounce_stripes", "stripes_bounce",
                               "shake_hue_slide", "slide_hue_shake"}


def test_committed_demo_split_matches_generator():
    s = load_split("demo")
    assert {p: set(v) for p, v in s.classes.items()} == {p: set(v) for p, v in demo_data.class_steps().items()}


def test_videos_vary_within_a_class():
    a = demo_data.render_video(("spin", "pulse"), np.random.default_rng(1), (2, 3))
    b = demo_data.render_video(("spin", "pulse"), np.random.default_rng(2), (2, 3))
    assert a[0].shape == (240, 320, 3)
    assert len(a) != len(b) or not np.array_equal(a[0], b[0])


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo_data.generate(out, seed=3, videos_per_class=2, seconds=(0.7, 0.9), jobs=1, progress=False)
    return out


def test_generation_is_deterministic_and_idempotent(tiny_demo, tmp_path):
    f = tiny_demo / "spin_pulse" / "spin_pulse_001.avi"
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    again = tmp_path / "again"
    demo_data.generate(again, seed=3, videos_per_class=2, seconds=(0.7, 0.9), jobs=1, progress=False)
    assert hashlib.sha256((again / "spin_pulse" / "spin_pulse_001.avi").read_bytes()).hexdigest() == digest
    demo_data.generate(tiny_demo, seed=3, videos_per_class=2, seconds=(0.7, 0.9), jobs=1, progress=False)
    with pytest.raises(FileExistsError, match="other settings"):
        demo_data.generate(tiny_demo, seed=4, videos_per_class=2, seconds=(0.7, 0.9), jobs=1, progress=False)


def test_demo_reads_like_a_real_dataset(tiny_demo):
    entries, problems = resolve(load_split(tiny_demo / "splits"), tiny_demo)
    assert len(entries) == 48 and problems == []
    out = read_clips(entries[0].path, Sampling(), Preprocess(), views=1)
    assert out.clips.shape == (1, 3, 3, 16, 112, 112)
    assert out.size == (320, 240) and out.fps == 25
