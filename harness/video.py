"""mp4 episode videos from the simulator's RGB frames (OpenCV)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class VideoWriter:
    def __init__(self, path: Path, fps: int):
        self.path = Path(path)
        self.fps = max(int(fps), 1)
        self._writer = None

    def add(self, frame: np.ndarray | None) -> None:
        if frame is None:
            return
        import cv2

        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            height, width = frame.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
        self._writer.write(cv2.cvtColor(np.ascontiguousarray(frame, np.uint8), cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
