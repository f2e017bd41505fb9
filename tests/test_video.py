import numpy as np
import pytest

import cv2

from pipeline.extraction.video import (MFNET_MEAN, MFNET_STD, Crop, Preprocess, Sampling, VideoError, _region_plan,
                            center_crop, cut_clip, dense_indices, normalize, read_clips, resize_region,
                            segment_indices)


def test_segments_long_video_spreads_frames_uniformly():
    idx = segment_indices(96, clips=3, frames=16)  # 32 frames per segment: every other frame
    assert idx.shape == (3, 16)
    assert idx[0].tolist() == list(range(1, 32, 2))
    assert idx[1, 0] == 33 and idx[2, -1] == 95


def test_segments_exact_length_uses_every_frame_once():
    assert segment_indices(48, 3, 16).ravel().tolist() == list(range(48))


def test_segments_short_video_repeats_frames_in_order():
    idx = segment_indices(5, 3, 4)
    assert idx.max() == 4 and idx.min() == 0
    assert (np.diff(idx.ravel()) >= 0).all()  # time never runs backwards
    assert idx.tolist() == [[0, 0, 1, 1], [1, 2, 2, 3], [3, 3, 4, 4]]


def test_dense_non_overlapping_with_tail_window():
    idx = dense_indices(40, frames=16)
    assert idx[:, 0].tolist() == [0, 16, 24]  # last window flush with the end covers frames 32-39
    assert idx[-1, -1] == 39


def test_dense_exact_and_short_and_step_stride():
    assert dense_indices(32, 16).shape == (2, 16)
    short = dense_indices(5, 16)
    assert short.shape == (1, 16) and short[0].tolist() == [0, 1, 2, 3, 4] + [4] * 11
    idx = dense_indices(100, 4, step=2, stride=10)
    assert idx[0].tolist() == [0, 2, 4, 6] and idx[1, 0] == 10
    assert idx[-1, -1] == 99


def test_sampling_validates_keys():
    with pytest.raises(ValueError, match="sampling.mode"):
        Sampling(mode="random")
    with pytest.raises(ValueError, match="sampling.frames"):
        Sampling(frames=0)


def test_normalize_matches_hand_computed_pixels():
    clip = np.zeros((1, 1, 2, 3), np.uint8)
    clip[0, 0, 0] = (124, 117, 104)        # exactly the mean: all zero
    clip[0, 0, 1] = (255, 0, 10)
    x = normalize(clip)                     # (3, F, H, W)
    assert x.shape == (3, 1, 1, 2)
    assert np.allclose(x[:, 0, 0, 0], 0, atol=1e-6)
    # (x - mean) * 0.0167, per channel, in RGB order
    assert np.allclose(x[:, 0, 0, 1], [(255 - 124) * 0.0167, (0 - 117) * 0.0167, (10 - 104) * 0.0167], atol=1e-5)
    assert np.allclose(MFNET_STD[0], 1 / 4.2585)
    assert np.isclose(MFNET_MEAN[0] * 255, 124)


def test_center_crop_and_flip_are_the_same_for_all_frames():
    assert center_crop(256, 256, 112) == Crop(72, 72)
    frames = {i: np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) + i for i in range(2)}
    a = cut_clip(frames, np.array([0, 1]), Crop(1, 1), 2)
    b = cut_clip(frames, np.array([0, 1]), Crop(1, 1, flip=True), 2)
    assert a.shape == (2, 2, 2, 3) and a.dtype == np.uint8   # (F, H, W, RGB)
    assert np.array_equal(a[:, :, ::-1], b)


def test_torch_normalisation_matches_numpy():
    import torch
    from pipeline.extraction.video import normalize_batch
    clip = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    assert np.allclose(normalize_batch(torch.from_numpy(clip[None]))[0].numpy(), normalize(clip), atol=1e-6)


def test_extraction_table_normalisation_is_normalize_batch_exactly():
    import torch
    from pipeline.extraction.backbone import BatchForward
    from pipeline.extraction.settings import ExtractSettings
    from pipeline.extraction.video import normalize_batch
    forward = BatchForward(torch.nn.Identity(), torch.device("cpu"), ExtractSettings(), channels_last=False)
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 8, 6, 3), dtype=np.uint8)
    x = forward.normalize(clips)
    assert x.shape == (2, 3, 4, 8, 6) and x.dtype == torch.float32
    assert torch.equal(x, normalize_batch(torch.from_numpy(clips)))


@pytest.mark.parametrize("src,dst,box", [((320, 240), (256, 256), (72, 184, 72, 184)),
                                         ((320, 240), (341, 256), (72, 184, 114, 226)),
                                         ((176, 144), (256, 256), (3, 115, 140, 252)),
                                         ((341, 256), (256, 256), (0, 112, 0, 256))])
def test_resize_region_is_the_full_resize_cut(src, dst, box):
    img = np.random.default_rng(1).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    full = cv2.resize(img, dst, interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(resize_region(img, dst, box), full[box[0]:box[1], box[2]:box[3]])


def test_paper_geometry_resizes_only_around_the_crop():
    # 320x240 -> 256x256, centre 112 crop: source periods are 5 columns and 15 rows
    rows, cols, out_size, offset = _region_plan(320, 240, 256, 256, 72, 184, 72, 184)
    assert (rows, cols) == (slice(60, 180), slice(85, 235)) and out_size == (120, 128) and offset == (8, 4)


def test_clips_equal_whole_frame_preprocessing(tmp_path):
    # colourful frames, so a channel swap or a one-level rounding difference would show
    rng = np.random.default_rng(3)
    path = tmp_path / "colour.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    for _ in range(30):
        w.write(cv2.resize(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8), (160, 120)))
    w.release()
    cap = cv2.VideoCapture(str(path))
    decoded = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    for pre in (Preprocess(resize=128, crop=64), Preprocess(resize_mode="short", resize=100, crop=64)):
        out = read_clips(path, Sampling(clips=3, frames=4), pre, views=3, seed=5, raw=True)
        size = pre.resized_size(160, 120)
        for v, row in enumerate(out.crops):
            for c, cr in enumerate(row):
                ref = np.stack([cv2.resize(decoded[i], size, interpolation=cv2.INTER_LINEAR)
                                [cr.y:cr.y + 64, cr.x:cr.x + 64] for i in out.indices[c]])
                assert np.array_equal(out.clips[v, c], ref[:, :, ::-1] if cr.flip else ref)


def test_resize_modes():
    assert Preprocess().resized_size(320, 240) == (256, 256)
    assert Preprocess(resize_mode="short", resize=128).resized_size(320, 240) == (170, 128)


@pytest.mark.parametrize("fourcc,ext", [("MJPG", "avi"), ("mp4v", "mp4")])
def test_reader_on_real_codecs(make_video, fourcc, ext):
    path = make_video(f"v.{ext}", 60, fourcc)
    out = read_clips(path, Sampling(clips=3, frames=4), Preprocess(resize=64, crop=32), views=2, seed=1)
    assert out.clips.shape == (2, 3, 3, 4, 32, 32) and out.clips.dtype == np.float32
    assert out.n_frames == 60
    # frame i is grey 10 + 3 i: decoded values identify the sampled frames (codecs shift levels by a
    # few units through YUV, the same for every frame, so compare steps exactly and levels loosely)
    red = (out.clips[0, :, 0, :, 16, 16] / 0.0167 + 124).ravel()
    assert np.allclose(np.diff(red), 3 * np.diff(out.indices.ravel()), atol=1.5)
    assert np.allclose(red, 10 + 3 * out.indices.ravel(), atol=6)
    again = read_clips(path, Sampling(clips=3, frames=4), Preprocess(resize=64, crop=32), views=2, seed=1)
    assert np.array_equal(out.clips, again.clips)


def test_views_differ_by_seeded_random_crops(make_video):
    path = make_video("v.avi", 20)
    out = read_clips(path, Sampling(clips=2, frames=2), Preprocess(resize=64, crop=32), views=3, seed=7)
    assert out.crops[0][0] == Crop(16, 16)
    assert len({out.crops[v][c] for v in (1, 2) for c in (0, 1)}) > 1


def test_header_that_overstates_frames_samples_existing_frames(make_video, tmp_path):
    good = make_video("full.avi", 80)
    data = good.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])  # the header still says 80 frames
    out = read_clips(cut, Sampling(clips=3, frames=4), Preprocess(resize=64, crop=32))
    assert out.header_frames == 80
    assert 0 < out.n_frames < 80
    assert out.indices.max() < out.n_frames


def test_header_that_understates_frames_still_samples_the_whole_video(make_video, monkeypatch):
    from pipeline.extraction import video
    path = make_video("full.avi", 80)
    real = video.probe
    monkeypatch.setattr(video, "probe", lambda p: (30, *real(p)[1:]))      # a container claiming 30 of 80 frames
    out = read_clips(path, Sampling(clips=3, frames=4), Preprocess(resize=64, crop=32))
    assert out.header_frames == 30 and out.n_frames == 80
    assert out.indices.tolist() == Sampling(clips=3, frames=4).indices(80).tolist() and out.indices.max() > 60


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (bytes(range(256)) * 40, "not a readable video")])
def test_bad_files_name_the_file_and_the_reason(tmp_path, content, reason):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(content)
    with pytest.raises(VideoError, match=reason) as e:
        read_clips(bad, Sampling(), Preprocess())
    assert str(bad) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_clips(tmp_path / "nope.avi", Sampling(), Preprocess())
