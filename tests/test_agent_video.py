"""`edge-agent run` on a finite video (video:PATH?loop=0): the run ends cleanly when the file ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.service import RUN_WARMUP
from tests.models import tiny_cnn
from tests.test_agent_cli import RUNTIME, agent, json_lines

cv2 = pytest.importorskip("cv2")
FRAMES = 40


@pytest.fixture(scope="module")
def video_bundle(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> tuple[Path, Path]:
    from converters.package import build_bundle

    d = tmp_path_factory.mktemp("video")
    video = d / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for i in range(FRAMES):
        writer.write(np.full((24, 32, 3), (i * 6) % 256, np.uint8))
    writer.release()
    model = tiny_cnn(d / "cnn.onnx", channels=3, size=8)
    manifest = {
        "name": "cnn", "version": "1.0.0", "profile": "x86-64", "format": "onnx", "engine": "onnxruntime",
        "model": "model.onnx",
        "inputs": [{"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}],
        "preprocessing": {"size": [8, 8], "color": "rgb", "layout": "NCHW", "resize_mode": "letterbox"},
        "runtime": RUNTIME, "tools": {"edgekit": "0.1.0"},
    }
    bundle = build_bundle(d / "cnn.edgebundle", manifest, {"model.onnx": model}, keypair[0])
    return bundle, video


def test_finite_video_ends_the_run_cleanly_with_every_frame_counted(video_bundle: tuple[Path, Path],
                                                                     keypair: tuple[Path, Path]) -> None:
    bundle, video = video_bundle
    r = agent("-v", "run", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--source",
              f"video:{video}?loop=0", "--window", "30", "--json")
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert len(windows) == 1  # ended long before the 30 s window closed
    assert sum(w["count"] for w in windows) == FRAMES - RUN_WARMUP
    assert "source ended" in r.stderr


def test_looping_video_runs_past_the_end_of_the_file(video_bundle: tuple[Path, Path],
                                                     keypair: tuple[Path, Path]) -> None:
    bundle, video = video_bundle
    r = agent("run", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--source", f"video:{video}",
              "--duration", "1.5", "--window", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    assert sum(w["count"] for w in json_lines(r.stdout)) > FRAMES
