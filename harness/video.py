"""Episode videos that play in a browser: VP9 in WebM (OpenCV's bundled FFmpeg has no H.264 encoder in
the PyPI wheels; VP9 it has), with an overlay of time, speed, controls, agent and route progress."""
from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_SUFFIX = ".webm"
FOURCC = "VP90"
_BAND_PX = 18  # height of one overlay text line


class VideoWriter:
    def __init__(self, path: Path, fps: int):
        self.path = Path(path).with_suffix(VIDEO_SUFFIX)
        self.fps = max(int(fps), 1)
        self._writer = None

    def add(self, frame: np.ndarray | None, overlay: list[str] | tuple[str, ...] = ()) -> None:
        """Append an RGB frame (H, W, 3) with `overlay` text lines drawn on a dark band at its top."""
        if frame is None:
            return
        import cv2

        image = cv2.cvtColor(np.ascontiguousarray(frame, np.uint8), cv2.COLOR_RGB2BGR)
        if overlay:
            band = min(_BAND_PX * len(overlay) + 6, image.shape[0])
            image[:band] = (image[:band] * 0.35).astype(np.uint8)
            for i, line in enumerate(overlay):
                cv2.putText(image, line, (6, 14 + _BAND_PX * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                            cv2.LINE_AA)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            height, width = image.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*FOURCC), self.fps, (width, height))
            if not self._writer.isOpened():
                raise RuntimeError(f"{self.path}: OpenCV cannot write {FOURCC} video here")
        self._writer.write(image)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def overlay_lines(agent: str, sim_time_s: float, speed_mps: float, throttle: float, brake: float, steer: float,
                  route_completion: float, infractions: int) -> list[str]:
    return [f"{agent}   t {sim_time_s:5.1f} s   {speed_mps * 3.6:5.1f} km/h",
            f"throttle {throttle:.2f}  brake {brake:.2f}  steer {steer:+.2f}",
            f"route {route_completion:5.1f} %   infractions {infractions}"]
