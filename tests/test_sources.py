"""edge_agent.sources: synthetic, npy:/npz, images:, video/camera/stream (a fake capture driving the
reconnect logic, real OpenCV decoding of a video file written here, a real HTTP stream) and serial (pyserial
loop://, a real pty) sources, and their errors."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import quantize
from edge_agent.sources import (
    SYNTHETIC_POOL,
    CaptureSource,
    SerialSource,
    SourceEnded,
    backoff_delays,
    open_source,
    parse_line,
)

X = (TensorSpec("x", (1, 16), "float32"),)
IMG = (TensorSpec("image", (1, 1, 8, 8), "float32"),)
Q = (TensorSpec("q", (1, 4), "int8", scale=0.05, zero_point=-3),)
PRE = {"size": [8, 8], "color": "gray", "layout": "NCHW", "scale": 1 / 255, "mean": [0.5], "std": [0.25]}


def take(src, n: int) -> list[list[np.ndarray]]:
    return [src.next() for _ in range(n)]


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_matches_shapes_and_dtypes_and_cycles() -> None:
    specs = (TensorSpec("a", (1, 3, 4, 4), "float32"), TensorSpec("b", (-1, 5), "int64"))
    src = open_source("synthetic", specs, None)
    feeds = take(src, SYNTHETIC_POOL + 1)
    assert feeds[0][0].shape == (1, 3, 4, 4) and feeds[0][0].dtype == np.float32
    assert feeds[0][1].shape == (1, 5) and feeds[0][1].dtype == np.int64  # dynamic dim -> 1
    assert feeds[SYNTHETIC_POOL][0] is feeds[0][0]  # a pool, cycled: no RNG in the loop
    assert not np.array_equal(feeds[0][0], feeds[1][0])


def test_synthetic_int8_uses_full_range() -> None:
    src = open_source("synthetic", (TensorSpec("q", (1, 4096), "int8", 0.1, 0),), None)
    x = np.concatenate([f[0] for f in take(src, SYNTHETIC_POOL)], axis=None)
    assert x.dtype == np.int8 and x.min() == -128 and x.max() == 127


def test_synthetic_is_deterministic_per_seed() -> None:
    a = open_source("synthetic", X, None, seed=5).next()[0]
    b = open_source("synthetic", X, None, seed=5).next()[0]
    c = open_source("synthetic", X, None, seed=6).next()[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------- npy

def test_npy_stack_is_split_and_cycled(tmp_path: Path) -> None:
    data = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
    np.save(tmp_path / "s.npy", data)
    feeds = take(open_source(f"npy:{tmp_path / 's.npy'}", X, None), 4)
    assert [f[0].shape for f in feeds] == [(1, 16)] * 4
    assert np.array_equal(feeds[1][0][0], data[1])
    assert np.array_equal(feeds[3][0], feeds[0][0])


def test_npy_sample_without_batch_axis(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.ones(16, dtype=np.float64))
    (x,) = open_source(f"npy:{tmp_path / 'one.npy'}", X, None).next()
    assert x.shape == (1, 16) and x.dtype == np.float32


def test_npy_float_for_int8_input_is_quantized(tmp_path: Path) -> None:
    data = np.array([[0.0, 0.5, -1.0, 10.0]], dtype=np.float32)
    np.save(tmp_path / "f.npy", data)
    (q,) = open_source(f"npy:{tmp_path / 'f.npy'}", Q, None).next()
    assert q.dtype == np.int8
    assert np.array_equal(q, quantize(data, 0.05, -3, "int8"))
    assert q[0, 3] == 127  # clipped


def test_npz_multi_input(tmp_path: Path) -> None:
    specs = (TensorSpec("a", (1, 2), "float32"), TensorSpec("b", (1, 3), "float32"))
    np.savez(tmp_path / "m.npz", a=np.zeros((2, 2)), b=np.ones((2, 3)))
    feeds = open_source(f"npy:{tmp_path / 'm.npz'}", specs, None).next()
    assert [f.shape for f in feeds] == [(1, 2), (1, 3)]
    assert feeds[1].sum() == 3


def test_npy_wrong_shape_names_file_and_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(SourceError) as e:
        open_source(f"npy:{tmp_path / 'bad.npy'}", X, None)
    msg = str(e.value)
    assert "bad.npy" in msg and "(2, 7)" in msg and "(1, 16)" in msg
    assert e.value.exit_code == 2


def test_npy_missing_and_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"npy:{tmp_path / 'nope.npy'}", X, None)
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.float32))
    with pytest.raises(SourceError, match="no samples"):
        open_source(f"npy:{tmp_path / 'empty.npy'}", X, None)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(SourceError, match=r"junk\.npy"):
        open_source(f"npy:{tmp_path / 'junk.npy'}", X, None)


def test_npy_for_multi_input_model_asks_for_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 2), np.float32))
    specs = (TensorSpec("a", (1, 2), "float32"), TensorSpec("b", (1, 3), "float32"))
    with pytest.raises(SourceError, match="npz"):
        open_source(f"npy:{tmp_path / 'a.npy'}", specs, None)


def test_int_data_out_of_range_for_int8(tmp_path: Path) -> None:
    np.save(tmp_path / "i.npy", np.array([[0, 1, 2, 300]], dtype=np.int32))
    with pytest.raises(SourceError, match="outside the range"):
        open_source(f"npy:{tmp_path / 'i.npy'}", Q, None)


# ---------------------------------------------------------------------------------------------- images

def _write_images(folder: Path, n: int) -> list[np.ndarray]:
    import cv2

    folder.mkdir()
    imgs = []
    for i in range(n):
        img = np.full((12, 10, 3), 20 * (i + 1), dtype=np.uint8)
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), img)
        imgs.append(img)
    (folder / "notes.txt").write_text("not an image")
    return imgs


def test_images_are_preprocessed_and_cycled(tmp_path: Path) -> None:
    from edge_agent.preprocess import Preprocessing, image_to_tensor

    imgs = _write_images(tmp_path / "imgs", 3)
    src = open_source(f"images:{tmp_path / 'imgs'}", IMG, PRE)
    feeds = take(src, 4)
    assert feeds[0][0].shape == (1, 1, 8, 8) and feeds[0][0].dtype == np.float32
    expected = image_to_tensor(imgs[1], Preprocessing.from_dict(PRE))
    assert np.allclose(feeds[1][0], expected)
    assert np.array_equal(feeds[3][0], feeds[0][0])


def test_images_in_class_subfolders_are_found_in_sorted_order(tmp_path: Path) -> None:
    import cv2

    root = tmp_path / "labelled"
    for label, value in (("b", 200), ("a", 100)):
        (root / label).mkdir(parents=True)
        assert cv2.imwrite(str(root / label / "x.png"), np.full((8, 8), value, np.uint8))
    (root / ".hidden").mkdir()
    assert cv2.imwrite(str(root / ".hidden" / "y.png"), np.zeros((8, 8), np.uint8))
    src = open_source(f"images:{root}", IMG, PRE)
    first, second, third = (f[0] for f in take(src, 3))
    # a/x.png (100) before b/x.png (200); the hidden folder is skipped, so the third cycles to a/x.png
    assert first.mean() < second.mean()
    assert np.array_equal(third, first)


def test_images_for_int8_input_are_quantized(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 1)
    spec = (TensorSpec("image", (1, 1, 8, 8), "uint8", scale=1 / 64, zero_point=128),)
    (x,) = open_source(f"images:{tmp_path / 'imgs'}", spec, PRE).next()
    assert x.dtype == np.uint8


IMAGENET_PRE = {"size": [8, 8], "color": "rgb", "layout": "NCHW", "scale": 1 / 255,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize(("layout", "dtype", "scale", "zero_point"), [
    ("NCHW", "int8", 0.018631115555763245, -14),  # MobileNetV2's input
    ("NHWC", "uint8", 1 / 64, 128),
])
def test_images_for_int8_input_equal_the_float_path_quantized(tmp_path: Path, layout: str, dtype: str,
                                                              scale: float, zero_point: int) -> None:
    """The fused table look-up (image_to_input) gives exactly quantize(image_to_tensor(...))."""
    import cv2

    from edge_agent.preprocess import Preprocessing, image_to_tensor

    rng = np.random.default_rng(4)
    (tmp_path / "imgs").mkdir()
    imgs = [rng.integers(0, 256, (30, 22, 3), dtype=np.uint8), rng.integers(0, 256, (9, 14), dtype=np.uint8)]
    for i, img in enumerate(imgs):
        assert cv2.imwrite(str(tmp_path / "imgs" / f"{i}.png"), img)  # PNG: lossless
    pre = {**IMAGENET_PRE, "layout": layout}
    shape = (1, 3, 8, 8) if layout == "NCHW" else (1, 8, 8, 3)
    spec = (TensorSpec("image", shape, dtype, scale=scale, zero_point=zero_point),)
    src = open_source(f"images:{tmp_path / 'imgs'}", spec, pre)
    for img in imgs:
        (q,) = src.next()
        want = quantize(image_to_tensor(img, Preprocessing.from_dict(pre)), scale, zero_point, dtype)
        assert q.dtype == np.dtype(dtype) and q.shape == shape and np.array_equal(q, want)


def test_images_cache_is_bounded(tmp_path: Path) -> None:
    from edge_agent.sources import ImageSource

    _write_images(tmp_path / "imgs", 3)
    src = ImageSource(tmp_path / "imgs", IMG, PRE, cache_bytes=2 * 8 * 8 * 4)
    first = take(src, 3)
    again = take(src, 3)
    assert again[0][0] is first[0][0] and again[1][0] is first[1][0]  # cached
    assert again[2][0] is not first[2][0] and np.array_equal(again[2][0], first[2][0])  # re-read


def test_images_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no preprocessing"):
        open_source(f"images:{tmp_path}", IMG, None)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"images:{tmp_path / 'nope'}", IMG, PRE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        open_source(f"images:{tmp_path / 'empty'}", IMG, PRE)
    _write_images(tmp_path / "imgs", 1)
    wrong = (TensorSpec("image", (1, 3, 8, 8), "float32"),)
    with pytest.raises(SourceError, match=r"00\.png.*\(1, 1, 8, 8\).*\(1, 3, 8, 8\)"):
        open_source(f"images:{tmp_path / 'imgs'}", wrong, PRE)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SourceError, match=r"a\.jpg"):
        open_source(f"images:{tmp_path / 'broken'}", IMG, PRE)


# ---------------------------------------------------------------------------------------------- specs

INCOMPLETE = ("npy", "npy:", "images:", "video:", "camera:", "serial:")


@pytest.mark.parametrize("spec", ["webcam:0", "random", "synthetic:3", "", "rtsp:", "rtsp://", "ftp://h/x",
                                  *INCOMPLETE])
def test_unknown_or_incomplete_spec(spec: str) -> None:
    with pytest.raises(SourceError) as e:
        open_source(spec, X, None)
    assert e.value.exit_code == 2
    if spec in INCOMPLETE:
        assert "needs a" in str(e.value)
    else:
        assert "synthetic, npy:PATH, images:DIR, video:PATH" in str(e.value)
        assert "camera:N" in str(e.value) and "serial:PORT" in str(e.value)


# ---------------------------------------------------------------------------------------------- capture: fake


RGB = (TensorSpec("image", (1, 4, 4, 3), "float32"),)
PRE_RGB = {"size": [4, 4], "color": "rgb", "layout": "NHWC", "scale": 1.0, "mean": [0.0], "std": [1.0]}


def frame(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


class FakeCapture:
    """cv2.VideoCapture as the source uses it: opened or not, then a script of frames (None = a failed read)."""

    def __init__(self, opened: bool, frames: list[np.ndarray | None]) -> None:
        self.opened = opened
        self.frames = list(frames)
        self.released = False

    def isOpened(self) -> bool:
        return self.opened and not self.released

    def read(self) -> tuple[bool, np.ndarray | None]:
        assert not self.released, "read after release"
        if not self.frames:
            return False, None
        f = self.frames.pop(0)
        return (f is not None), f

    def release(self) -> None:
        self.released = True


class FakeDevice:
    """Hands out one scripted capture per open; records the targets it was opened with."""

    def __init__(self, *captures: FakeCapture) -> None:
        self.captures = list(captures)
        self.opened: list[FakeCapture] = []

    def __call__(self, target: int | str) -> FakeCapture:
        assert self.captures, "opened more often than scripted"
        self.opened.append(self.captures.pop(0))
        return self.opened[-1]


class FakeSleep:
    """Records the back-off waits and what the source said about itself meanwhile; may act on a given call."""

    def __init__(self, src_ref: list, on_call: dict[int, Callable[[], None]] | None = None) -> None:
        self.src_ref = src_ref
        self.delays: list[float] = []
        self.healthy: list[bool] = []
        self.on_call = on_call or {}

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.src_ref:
            self.healthy.append(self.src_ref[0].healthy)
        action = self.on_call.get(len(self.delays))
        if action is not None:
            action()


def values(src: Any, n: int) -> list[int]:
    return [int(src.next()[0][0, 0, 0, 0]) for _ in range(n)]


def test_backoff_doubles_to_the_cap() -> None:
    assert list(itertools.islice(backoff_delays(), 8)) == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert list(itertools.islice(backoff_delays(0.25, 0.6), 4)) == [0.25, 0.5, 0.6, 0.6]


def test_camera_reconnects_with_backoff_and_counts() -> None:
    device = FakeDevice(
        FakeCapture(True, [frame(1), frame(2), None]),  # works, then the camera drops
        FakeCapture(False, []),  # attempt 1: cannot open
        FakeCapture(True, [None]),  # attempt 2: opens, no frame
        FakeCapture(True, [frame(3), frame(4), None]),  # attempt 3: back
        FakeCapture(True, [frame(5)]),  # after the second drop: first attempt works
    )
    ref: list = []
    sleep = FakeSleep(ref)
    src = CaptureSource(0, "camera", RGB, PRE_RGB, opener=device, sleep=sleep)
    ref.append(src)
    assert values(src, 2) == [1, 2]
    assert src.healthy and src.reconnects == 0
    assert values(src, 1) == [3]  # blocks through the outage, then returns the first new frame
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert sleep.healthy == [False, False, False]  # not healthy while reconnecting
    assert (src.reconnects, src.reconnect_attempts, src.dropped_frames) == (1, 3, 2)
    assert src.healthy
    assert all(c.released for c in device.opened[:3])  # every failed capture released
    assert values(src, 2) == [4, 5]
    assert sleep.delays == [0.5, 1.0, 2.0, 0.5]  # the back-off starts again after a success
    assert src.stats() == {"frames": 5, "dropped_frames": 3, "reconnects": 2, "reconnect_attempts": 4,
                           "loops": 0, "healthy": True}


def test_stop_during_reconnect_ends_the_source() -> None:
    stop = threading.Event()
    device = FakeDevice(FakeCapture(True, [frame(1), None]), *(FakeCapture(False, []) for _ in range(2)),
                        FakeCapture(True, [frame(7)]))
    sleep = FakeSleep([], on_call={3: stop.set})
    src = CaptureSource("rtsp://u:secret@cam/s", "stream", RGB, PRE_RGB, opener=device, sleep=sleep, stop=stop)
    assert values(src, 1) == [1]
    with pytest.raises(SourceEnded) as e:
        src.next()
    assert e.value.reason == "stopped" and sleep.delays == [0.5, 1.0, 2.0]
    assert src.reconnect_attempts == 2 and not src.healthy
    assert "secret" not in str(e.value) and "***@cam" in str(e.value)
    with pytest.raises(SourceEnded, match="stopped"):  # still stopped: no attempt
        src.next()
    stop.clear()  # asked again after the stop was withdrawn: reconnecting resumes
    assert values(src, 1) == [7] and src.healthy and src.reconnects == 1


def test_stop_event_already_set_does_not_wait() -> None:
    stop = threading.Event()
    stop.set()
    src = CaptureSource(0, "camera", RGB, PRE_RGB, opener=FakeDevice(FakeCapture(True, [frame(1), None])),
                        stop=stop)  # real waits on the stop event: returns at once because it is set
    src.next()
    with pytest.raises(SourceEnded, match="stopped"):
        src.next()


def test_closed_capture_source() -> None:
    device = FakeDevice(FakeCapture(True, [frame(1), frame(2)]))
    src = CaptureSource(0, "camera", RGB, PRE_RGB, opener=device)
    src.close()
    assert device.opened[0].released
    with pytest.raises(SourceEnded) as e:
        src.next()
    assert e.value.reason == "closed"


def test_capture_open_failures() -> None:
    with pytest.raises(SourceError, match="cannot open camera 0") as e:
        CaptureSource(0, "camera", RGB, PRE_RGB, opener=FakeDevice(FakeCapture(False, [])))
    assert "video" in (e.value.hint or "")
    dead = FakeCapture(True, [None])
    with pytest.raises(SourceError, match="gave no frame"):
        CaptureSource(0, "camera", RGB, PRE_RGB, opener=FakeDevice(dead))
    assert dead.released
    wrong = (TensorSpec("image", (1, 3, 4, 4), "float32"),)
    with pytest.raises(SourceError, match=r"\(1, 4, 4, 3\).*\(1, 3, 4, 4\)"):
        CaptureSource(0, "camera", wrong, PRE_RGB, opener=FakeDevice(FakeCapture(True, [frame(1)])))
    with pytest.raises(SourceError, match="no preprocessing"):
        CaptureSource(0, "camera", RGB, None, opener=FakeDevice())
    unquantized = FakeCapture(True, [frame(1)])
    with pytest.raises(SourceError, match="no quantization scale"):
        CaptureSource(0, "camera", (TensorSpec("image", (1, 4, 4, 3), "uint8"),), PRE_RGB,
                      opener=FakeDevice(unquantized))
    assert unquantized.released  # a source that fails at open leaves no device open


def test_capture_frames_are_preprocessed_and_quantized() -> None:
    from edge_agent.preprocess import Preprocessing, image_to_tensor

    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (6, 9, 3), dtype=np.uint8) for _ in range(2)]
    spec = (TensorSpec("image", (1, 1, 8, 8), "int8", scale=1 / 128, zero_point=-128),)
    pre = {**PRE, "mean": [0.0], "std": [1.0], "resize_mode": "letterbox", "pad_value": 114}
    src = CaptureSource(2, "camera", spec, pre, opener=FakeDevice(FakeCapture(True, list(frames))))
    for f in frames:
        (q,) = src.next()
        assert q.dtype == np.int8 and q.shape == (1, 1, 8, 8)
        assert np.array_equal(q, quantize(image_to_tensor(f, Preprocessing.from_dict(pre)), 1 / 128, -128, "int8"))


def test_capture_rgb_frames_for_int8_nchw_equal_the_float_path_quantized() -> None:
    from edge_agent.preprocess import Preprocessing, image_to_tensor

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    spec = (TensorSpec("image", (1, 3, 8, 8), "int8", scale=0.018631115555763245, zero_point=-14),)
    src = CaptureSource(0, "camera", spec, IMAGENET_PRE, opener=FakeDevice(FakeCapture(True, list(frames))))
    pre = Preprocessing.from_dict(IMAGENET_PRE)
    for f in frames:
        (q,) = src.next()
        want = quantize(image_to_tensor(f, pre), 0.018631115555763245, -14, "int8")
        assert q.dtype == np.int8 and np.array_equal(q, want)


def test_capture_for_float16_input_is_converted_from_float32() -> None:
    from edge_agent.preprocess import Preprocessing, image_to_tensor

    f = np.random.default_rng(6).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    spec = (TensorSpec("image", (1, 3, 8, 8), "float16"),)
    (x,) = CaptureSource(0, "camera", spec, IMAGENET_PRE, opener=FakeDevice(FakeCapture(True, [f]))).next()
    assert x.dtype == np.float16
    assert np.array_equal(x, image_to_tensor(f, Preprocessing.from_dict(IMAGENET_PRE)).astype(np.float16))


# ------------------------------------------------------------------------------------ capture: real OpenCV


VIDEO_FRAMES = 5


def write_video(path: Path, n: int = VIDEO_FRAMES, size: tuple[int, int] = (12, 16)) -> list[np.ndarray]:
    """A real MJPG .avi (a codec opencv-python-headless writes and reads through its bundled FFmpeg)."""
    import cv2

    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert writer.isOpened()
    frames = [np.full((h, w, 3), 40 * i + 10, np.uint8) for i in range(n)]
    for f in frames:
        writer.write(f)
    writer.release()
    return frames


VID = (TensorSpec("image", (1, 3, 8, 8), "float32"),)
PRE_VID = {"size": [8, 8], "color": "rgb", "layout": "NCHW", "scale": 1.0, "mean": [0.0], "std": [1.0],
           "resize_mode": "letterbox", "pad_value": 3}


def test_video_file_is_decoded_preprocessed_and_looped(tmp_path: Path) -> None:
    write_video(tmp_path / "v.avi")
    src = open_source(f"video:{tmp_path / 'v.avi'}", VID, PRE_VID)
    feeds = [src.next()[0] for _ in range(2 * VIDEO_FRAMES + 1)]
    assert all(x.shape == (1, 3, 8, 8) and x.dtype == np.float32 for x in feeds)
    # 12x16 letterboxed into 8x8: 6x8 of picture, one row of padding above and below
    assert (feeds[0][:, :, [0, 7]] == 3).all()
    centres = [float(np.median(x[:, :, 1:7])) for x in feeds[:VIDEO_FRAMES]]
    assert centres == pytest.approx([10, 50, 90, 130, 170], abs=2)  # JPEG is lossy, a little
    assert all(np.array_equal(a, b) for a, b in zip(feeds, feeds[VIDEO_FRAMES:], strict=False))
    assert src.loops == 2 and src.frames == 2 * VIDEO_FRAMES + 1 and src.dropped_frames == 0
    src.close()


def test_video_file_for_int8_input_equals_the_float_path_quantized(tmp_path: Path) -> None:
    import cv2

    from edge_agent.preprocess import Preprocessing, image_to_tensor

    write_video(tmp_path / "v.avi")
    cap = cv2.VideoCapture(str(tmp_path / "v.avi"))
    decoded = [cap.read()[1] for _ in range(VIDEO_FRAMES)]
    cap.release()
    pre = {**PRE_VID, "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    spec = (TensorSpec("image", (1, 3, 8, 8), "int8", scale=0.018631115555763245, zero_point=-14),)
    src = open_source(f"video:{tmp_path / 'v.avi'}?loop=0", spec, pre)
    for f in decoded:
        (q,) = src.next()
        want = quantize(image_to_tensor(f, Preprocessing.from_dict(pre)), 0.018631115555763245, -14, "int8")
        assert q.dtype == np.int8 and np.array_equal(q, want)
    src.close()


def test_video_without_loop_ends_with_source_ended(tmp_path: Path) -> None:
    write_video(tmp_path / "v.avi")
    src = open_source(f"video:{tmp_path / 'v.avi'}?loop=0", VID, PRE_VID)
    assert len([src.next() for _ in range(VIDEO_FRAMES)]) == VIDEO_FRAMES
    for _ in range(2):  # and keeps saying so
        with pytest.raises(SourceEnded) as e:
            src.next()
        assert e.value.reason == "end" and f"after {VIDEO_FRAMES} frames" in str(e.value)
    assert isinstance(e.value, SourceError)


def test_video_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"video:{tmp_path / 'nope.avi'}", VID, PRE_VID)
    (tmp_path / "junk.avi").write_bytes(b"not a video at all")
    with pytest.raises(SourceError, match=r"junk\.avi"):
        open_source(f"video:{tmp_path / 'junk.avi'}", VID, PRE_VID)
    with pytest.raises(SourceError, match="loop='2' must be 0 or 1"):
        open_source(f"video:{tmp_path / 'v.avi'}?loop=2", VID, PRE_VID)
    with pytest.raises(SourceError, match="unknown option 'fps=3'"):
        open_source(f"video:{tmp_path / 'v.avi'}?fps=3", VID, PRE_VID)


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A real HTTP server on a free loopback port, serving tmp_path."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield tmp_path, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_stream_through_ffmpeg_reconnects_when_it_ends(http_folder: tuple[Path, int]) -> None:
    folder, port = http_folder
    write_video(folder / "live.avi")
    ref: list = []
    sleep = FakeSleep(ref)
    src = CaptureSource(f"http://127.0.0.1:{port}/live.avi", "stream", VID, PRE_VID, sleep=sleep)
    ref.append(src)
    feeds = [src.next()[0] for _ in range(VIDEO_FRAMES + 1)]  # the stream ends: a live source reconnects
    assert np.array_equal(feeds[VIDEO_FRAMES], feeds[0])
    assert (src.reconnects, src.dropped_frames, sleep.delays, sleep.healthy) == (1, 1, [0.5], [False])


def test_unreachable_stream_is_a_source_error_without_the_password() -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match=r"cannot open stream http://\*\*\*@127\.0\.0\.1") as e:
        open_source(f"http://admin:hunter2@127.0.0.1:{port}/video.mjpg", VID, PRE_VID)
    assert "hunter2" not in str(e.value)


def test_camera_specs() -> None:
    for bad in ("camera:front", "camera:²"):
        with pytest.raises(SourceError, match="camera:N"):
            open_source(bad, VID, PRE_VID)
    with pytest.raises(SourceError, match="cannot open camera /dev/video99"):
        open_source("camera:/dev/video99", VID, PRE_VID)


# ---------------------------------------------------------------------------------------------- serial


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    """The agent's stop event, set by a watchdog after 10 s so that no test can hang on a blocking read."""
    event = threading.Event()
    watchdog = threading.Timer(10.0, event.set)
    watchdog.start()
    yield event
    watchdog.cancel()


@pytest.fixture
def loop_port() -> Iterator[Any]:
    import serial

    port = serial.serial_for_url("loop://", timeout=0.05)
    yield port
    port.close()


SENSOR = (TensorSpec("x", (1, 42), "float32"),)


def csv(*rows: Sequence[float], sep: str = ",") -> bytes:
    return b"".join(sep.join(f"{v:g}" for v in row).encode() + b"\n" for row in rows)


def test_parse_line() -> None:
    assert np.array_equal(parse_line(b" 1, 2.5 ,-3e1\r", 3), [1, 2.5, -30])
    assert np.array_equal(parse_line(b"1 2\t3", 3), [1, 2, 3])
    assert parse_line(b"ax,ay,az", 3) == "not numbers"
    assert parse_line(b"1,2", 3) == "2 values, expected 3"
    assert parse_line(b"1,,3", 3) == parse_line(b"1,2,3,", 3) == "an empty field"  # never a shifted sample
    assert np.array_equal(parse_line(b"7", 1), [7])
    assert parse_line(b"1,nan,3", 3) == "a non-finite value"


def test_serial_lines_become_samples_and_bad_lines_are_counted(loop_port: Any, stop: threading.Event) -> None:
    good = np.arange(42, dtype=np.float32) / 4
    loop_port.write(b",".join(f"a{i}".encode() for i in range(42)) + b"\n")  # a header
    loop_port.write(csv(good))
    loop_port.write(csv(good[:41]))  # one value short
    loop_port.write(b"\r\n\n")  # blank lines: ignored, not counted
    loop_port.write(csv(good * 2, sep=" "))
    loop_port.write(b"\xff\xfe garbage\n" + csv(np.r_[good[:41], np.inf]))
    loop_port.write(csv(-good, sep=", "))
    src = SerialSource("loop://", SENSOR, opener=lambda: loop_port, stop=stop)
    samples = [src.next()[0] for _ in range(3)]
    assert all(x.shape == (1, 42) and x.dtype == np.float32 for x in samples)
    assert np.array_equal(samples[0][0], good) and np.array_equal(samples[1][0], good * 2)
    assert np.array_equal(samples[2][0], -good)
    assert src.stats() == {"samples": 3, "lines": 3, "bad_lines": 4, "reconnects": 0, "reconnect_attempts": 0,
                           "healthy": True}


def test_serial_floats_are_quantized_for_int8(loop_port: Any, stop: threading.Event) -> None:
    loop_port.write(b"0.0, 0.5, -1.0, 10.0\n")
    (q,) = SerialSource("loop://", Q, opener=lambda: loop_port, stop=stop).next()
    assert q.dtype == np.int8 and np.array_equal(q, quantize(np.array([[0, 0.5, -1, 10]]), 0.05, -3, "int8"))


def test_serial_window_slides_by_hop(loop_port: Any, stop: threading.Event) -> None:
    rows = [(i, 10 * i, 100 * i) for i in range(8)]
    loop_port.write(csv(*rows[:3]) + b"1,2\n" + csv(*rows[3:]))  # a short line inside a window: skipped
    spec = (TensorSpec("acc", (1, 4, 3), "float32"),)
    src = SerialSource("loop://", spec, window=4, hop=2, opener=lambda: loop_port, stop=stop)
    got = [src.next()[0] for _ in range(3)]
    expect = np.array(rows, np.float32)
    for k, x in enumerate(got):
        assert x.shape == (1, 4, 3) and np.array_equal(x[0], expect[2 * k:2 * k + 4])
    assert src.bad_lines == 1 and src.samples == 3 and src.lines == 8


def test_serial_window_channels_first_flat_and_gaps(loop_port: Any, stop: threading.Event) -> None:
    rows = np.arange(24, dtype=np.float32).reshape(8, 3)
    loop_port.write(csv(*rows))
    first = (TensorSpec("acc", (1, 3, 4), "float32"),)  # channels first: the window is transposed
    (x,) = SerialSource("loop://", first, window=4, opener=lambda: loop_port, stop=stop).next()
    assert np.array_equal(x[0], rows[:4].T)
    loop_port.write(csv(*rows))
    flat = (TensorSpec("acc", (1, 6), "float32"),)  # window 2 of 3 values, hop 3: one line skipped between
    src = SerialSource("loop://", flat, window=2, hop=3, opener=lambda: loop_port, stop=stop)
    a, b, c = (src.next()[0][0] for _ in range(3))
    assert np.array_equal(a, rows[0:2].ravel()) and np.array_equal(b, rows[3:5].ravel())
    assert np.array_equal(c, rows[6:8].ravel())


class ChunkPort:
    """A port that returns scripted chunks, then timeouts (b"")."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.in_waiting = 0

    def read(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def close(self) -> None:
        pass


def test_serial_overlong_line_is_dropped_whole(stop: threading.Event) -> None:
    from edge_agent.sources import MAX_LINE_BYTES

    big = b"1," * (MAX_LINE_BYTES // 2 + 100)  # no newline within the limit
    port = ChunkPort(big, b"3,4,5", b"6,7\n" + csv(range(42))[:50], csv(range(42))[50:])
    src = SerialSource("loop://", SENSOR, opener=lambda: port, stop=stop)
    (x,) = src.next()
    assert np.array_equal(x[0], np.arange(42)) and src.bad_lines == 1


class BrokenPort:
    """A port whose device went away: every read raises, as pyserial does for an unplugged USB adapter."""

    in_waiting = 0
    closed = False

    def read(self, n: int) -> bytes:
        import serial

        raise serial.SerialException("device reports readiness to read but returned no data")

    def close(self) -> None:
        self.closed = True


def test_serial_reconnects_with_backoff_and_resets_the_window(loop_port: Any, stop: threading.Event) -> None:
    import serial

    broken = BrokenPort()
    ports: list[Any] = [broken, SourceError("cannot open serial port /dev/ttyACM0"), loop_port]

    def opener() -> Any:
        p = ports.pop(0)
        if isinstance(p, Exception):
            raise p
        return p

    ref: list = []
    sleep = FakeSleep(ref)
    spec = (TensorSpec("acc", (1, 2, 3), "float32"),)
    src = SerialSource("/dev/ttyACM0", spec, window=2, opener=opener, sleep=sleep, stop=stop)
    ref.append(src)
    loop_port.write(csv((1, 2, 3), (4, 5, 6)))
    (x,) = src.next()
    assert np.array_equal(x[0], [[1, 2, 3], [4, 5, 6]])
    assert broken.closed and sleep.delays == [0.5, 1.0] and sleep.healthy == [False, False]
    assert (src.reconnects, src.reconnect_attempts) == (1, 2)
    assert src.healthy  # a valid line arrived
    assert isinstance(serial.SerialException("x"), OSError)  # pyserial's errors are OSErrors: caught as such


def test_serial_stop_and_close(loop_port: Any) -> None:
    stop = threading.Event()
    stop.set()
    src = SerialSource("loop://", SENSOR, opener=lambda: loop_port, stop=stop)
    with pytest.raises(SourceEnded) as e:
        src.next()  # no data at all: would block; the stop event ends it
    assert e.value.reason == "stopped"
    src = SerialSource("loop://", SENSOR, opener=lambda: loop_port)
    src.close()
    with pytest.raises(SourceEnded, match="closed"):
        src.next()


class SilentThenTalking:
    """Empty reads (timeouts) first, then one valid line; records the source's health at each read."""

    def __init__(self, src_ref: list, silent_reads: int, line: bytes) -> None:
        self.src_ref, self.left, self.line = src_ref, silent_reads, line
        self.in_waiting = 0
        self.healthy: list[bool] = []

    def read(self, n: int) -> bytes:
        self.healthy.append(self.src_ref[0].healthy)
        if self.left:
            self.left -= 1
            return b""
        return self.line

    def close(self) -> None:
        pass


def test_serial_silence_makes_the_source_unhealthy_until_a_valid_line() -> None:
    ref: list = []
    port = SilentThenTalking(ref, 3, csv(range(42)))
    ticks = itertools.count(0.0, 6.0)  # each look at the clock: 6 s later
    src = SerialSource("loop://", SENSOR, opener=lambda: port, clock=lambda: next(ticks), silence_s=10.0)
    ref.append(src)
    src.next()
    assert port.healthy == [True, True, False, False] and src.healthy


def test_serial_through_a_real_pty(stop: threading.Event) -> None:
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    done = threading.Event()

    def sensor() -> None:  # a microcontroller printing x,y,z lines in bursts, with a header first
        os.write(master, b"x,y,z\r\n")
        for i in range(0, 10, 3):
            os.write(master, csv(*rows[i:i + 3]).replace(b"\n", b"\r\n"))
            if done.wait(0.01):
                return

    writer = threading.Thread(target=sensor, daemon=True)
    try:
        spec = (TensorSpec("acc", (1, 4, 3), "float32"),)
        src = open_source(f"serial:{os.ttyname(slave)}?baud=115200&window=4&hop=3", spec, None, stop=stop)
        writer.start()
        got = [src.next()[0][0] for _ in range(3)]
        assert all(np.array_equal(g, rows[3 * k:3 * k + 4]) for k, g in enumerate(got))
        assert src.bad_lines == 1
        src.close()
    finally:
        done.set()
        writer.join(timeout=5)
        os.close(master)
        os.close(slave)


def test_serial_pty_hangup_reconnects_until_stopped(stop: threading.Event) -> None:
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    closed = [False]
    src_ref: list = []
    sleep = FakeSleep(src_ref, on_call={3: stop.set})
    try:
        src = SerialSource(os.ttyname(slave), SENSOR, opener=None, stop=stop, sleep=sleep)
        src_ref.append(src)
        os.write(master, csv(range(42)))  # after opening: pyserial flushes the input buffer when it opens
        assert np.array_equal(src.next()[0][0], np.arange(42))
        os.close(master)  # the device goes away: reads fail, the pty node is gone
        closed[0] = True
        with pytest.raises(SourceEnded, match="stopped"):
            src.next()
        assert sleep.delays == [0.5, 1.0, 2.0] and src.reconnect_attempts == 2 and src.reconnects == 0
        assert not src.healthy
        src.close()
        with pytest.raises(SourceEnded, match="closed"):
            src.next()
    finally:
        if not closed[0]:
            os.close(master)
        os.close(slave)


def test_serial_spec_errors(tmp_path: Path) -> None:
    shape = (TensorSpec("acc", (2, 6), "float32"),)
    with pytest.raises(SourceError, match=r"not a window of 4 time steps"):
        open_source("serial:loop://?window=4", shape, None)
    with pytest.raises(SourceError, match="window=3 lines cannot fill"):
        open_source("serial:loop://?window=3", (TensorSpec("x", (1, 10), "float32"),), None)
    with pytest.raises(SourceError, match="hop needs window"):
        open_source("serial:loop://?hop=2", SENSOR, None)
    for baud in ("fast", "0", "-9600", "９６００"):
        with pytest.raises(SourceError, match=rf"baud='{baud}' is not an integer >= 1"):
            open_source(f"serial:loop://?baud={baud}", SENSOR, None)
    with pytest.raises(SourceError, match=r"unknown option 'parity=N'") as e:
        open_source("serial:loop://?parity=N", SENSOR, None)
    assert "baud=" in (e.value.hint or "")
    with pytest.raises(SourceError, match="given twice"):
        open_source("serial:loop://?baud=1&baud=2", SENSOR, None)
    with pytest.raises(SourceError, match="needs a port"):
        open_source("serial:?baud=9600", SENSOR, None)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"serial:{tmp_path / 'ttyUSB9'}", SENSOR, None)
    with pytest.raises(SourceError, match="float or int8/uint8"):
        open_source("serial:loop://", (TensorSpec("x", (1, 3), "int32"),), None)
    with pytest.raises(SourceError, match="no quantization scale"):
        open_source("serial:loop://", (TensorSpec("x", (1, 3), "uint8"),), None)
    with pytest.raises(SourceError, match="one-input"):
        open_source("serial:loop://", (*SENSOR, *X), None)
    with pytest.raises(SourceError, match="cannot open serial port"):
        open_source("serial:rfc2217://127.0.0.1:1", SENSOR, None)


def test_serial_open_source_passes_options(stop: threading.Event) -> None:
    spec = (TensorSpec("acc", (1, 2, 3), "float32"),)
    src = open_source("serial:loop://?baud=9600&window=2&hop=1", spec, None, stop=stop)
    assert isinstance(src, SerialSource)
    src._port.write(csv((1, 2, 3), (4, 5, 6), (7, 8, 9)))  # loop:// reads back what is written to it
    assert src._port.baudrate == 9600
    a, b = src.next()[0][0], src.next()[0][0]
    assert np.array_equal(a, [[1, 2, 3], [4, 5, 6]]) and np.array_equal(b, [[4, 5, 6], [7, 8, 9]])
    src.close()
