"""Driving data as the models see it: a loaded split of expert rows, synthetic splits for tests, and
calibration samples for pruning. The data itself is made by `prunedrive.app.dataset` (simulator rollouts)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from prunedrive.harness.action import Control
from prunedrive.harness.observation import OBS_SHAPES
from prunedrive.models import text


@dataclass
class Split:
    """A loaded split: observations as arrays (N, ...) keyed like the env's observation, plus the table."""
    obs: dict[str, np.ndarray]
    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.frame)

    def observation(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.obs.items()}


def load_split(path: str | Path, split: str = "val") -> Split:
    """Load `<dir>/<split>.parquet` or a parquet file path."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset split at {path}; build one with app.dataset.build_dataset")
    table = pq.read_table(path)
    obs = {k: table.column(f"obs_{k}").combine_chunks().flatten().to_numpy().reshape(len(table), *shape)
           for k, shape in OBS_SHAPES.items()}
    frame = table.drop_columns([f"obs_{k}" for k in OBS_SHAPES]).to_pandas()
    return Split(obs, frame)


def synthetic_split(n: int = 24, seed: int = 0) -> Split:
    """Random but well-formed observations with expert-style answers and labels, no simulator needed
    (for unit tests and quick pruning-calibration checks; not driving data)."""
    rng = np.random.default_rng(seed)
    obs = {k: rng.normal(0, 5, (n, *s)).astype(np.float32) for k, s in OBS_SHAPES.items()}
    for k in ("route_mask", "vehicles_mask", "pedestrians_mask", "traffic_light_mask"):
        obs[k] = (rng.random((n, *OBS_SHAPES[k])) < 0.6).astype(np.float32)
    obs["route_mask"][:] = 1
    obs["route"][:, :, 0] = np.abs(obs["route"][:, :, 0]).cumsum(1)
    obs["traffic_light"][:, 0] = rng.integers(0, 3, n)
    rows = []
    for i in range(n):
        o = {k: v[i] for k, v in obs.items()}
        c = Control(float(rng.random()), 0.0, float(rng.uniform(-0.3, 0.3)))
        rows.append({**text.perception_labels(o), "throttle": c.throttle, "brake": c.brake, "steer": c.steer,
                     **{f"a_{k}": a for k, a in text.answers(o, c, "cruising").items()}})
    return Split(obs, pd.DataFrame(rows))


def lm_calibration_samples(model, split: Split, n_samples: int = 128, seed: int = 0,
                           kinds: tuple[str, ...] = tuple(text.QUESTIONS)) -> list[dict]:
    """Driving-domain calibration for pruning: per sampled row, the LM forward kwargs of the full teacher-forced
    sequence [latents] + prompt + answer (batch 1, unpadded, detached), questions cycling over `kinds`.
    Feed the list to models.pruning.driving_calibration / prune(..., calibration=...)."""
    import torch

    from prunedrive.models.driving_llm import collate

    samples = []
    with torch.no_grad():
        for r, ids in _calibration_rows(model, split, n_samples, seed, kinds):
            inputs = model.lm_inputs(collate([split.observation(r)]), torch.tensor([ids]))
            samples.append({k: v.detach() for k, v in inputs.items()})
    return samples


def _calibration_rows(model, split: Split, n_samples: int, seed: int, kinds: tuple[str, ...]):
    """(row, prompt + answer token ids) of the driving calibration samples, in order."""
    rows = np.random.default_rng(seed).permutation(len(split))[:n_samples]
    for j, r in enumerate(rows):
        kind = kinds[j % len(kinds)]
        yield int(r), model.prompt_ids(text.prompt(kind)) + model.tokenizer.encode(split.frame[f"a_{kind}"].iloc[r])


def lm_calibration_lengths(model, split: Split, n_samples: int = 128, seed: int = 0,
                           kinds: tuple[str, ...] = tuple(text.QUESTIONS)) -> list[int]:
    """The LM positions of each `lm_calibration_samples` sample (observation tokens + prompt + answer), without
    running the encoder: what a generic or random calibration set matches, token for token."""
    return [model.prefix_tokens + len(ids) for _, ids in _calibration_rows(model, split, n_samples, seed, kinds)]
