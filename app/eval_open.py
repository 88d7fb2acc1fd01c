"""Open-loop evaluation on a held-out split (Wayve "Driving with LLMs" Table 1 metrics).

Every question is asked for every sampled row; answers are parsed with models/text.py. As in Wayve, an
unparsable answer counts as an error of |label| (and as wrong for accuracies).

  vehicle_count_error, pedestrian_count_error: MAE of the nearby counts, a predicted count clipped to the
    observation's slots (a heavily pruned model can answer "555555555 vehicles"; one such answer
    would otherwise outweigh the whole split)
  lead_presence_accuracy; lead_distance_error: MAE on rows that have a lead car
  traffic_light_accuracy (state, "none" included); traffic_light_distance_error on rows with a light
    (NaN when the split has none: the highway backend has no traffic lights)
  lon_control_error: MAE of ((accel - brake) + 1) / 2; lat_control_error: MAE of signed steering
  parse rates per question

Text-format models (`prunedrive train --format text`, or any local Hugging Face causal LM directory) are asked the
action question only, exactly as agents/text_llm.py asks it (scene-text prompt, the agent's greedy decoding and
stop rules): lon/lat control errors and action_parse_rate; the perception metrics are left out (they were not
trained and would each cost a decode per row).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from prunedrive.app.prune_driving import training_data_dir
from prunedrive.harness.observation import MAX_PEDESTRIANS, MAX_VEHICLES
from prunedrive.models import text
from prunedrive.models.data import Split, load_split
from prunedrive.models.device import check_precision, torch_dtype
from prunedrive.models.driving_llm import DrivingLLM, DrivingLLMConfig


class TextModel:
    """A plain causal LM for open-loop evaluation: answers the action question through a TextLLMAgent (the same
    prompt, decoding and stop rules as closed-loop driving)."""

    kinds = ("action",)

    def __init__(self, model_dir: str | Path, **agent_options):
        from prunedrive.agents.text_llm import TextLLMAgent

        self.model_dir = Path(model_dir)
        self.agent = TextLLMAgent(model_dir, **agent_options)
        self.precision = {k: agent_options[k] for k in ("device", "dtype") if k in agent_options}

    def eval(self) -> "TextModel":
        self.agent.model.eval()
        return self

    def answer(self, observation: dict) -> str:
        self.agent.act(observation)
        return self.agent.last_text

    def randomized(self, seed: int = 0) -> "TextModel":
        """The same architecture, tokenizer and decoding with freshly initialised weights (the contrast row)."""
        from transformers import AutoModelForCausalLM

        other = TextModel(self.model_dir, name=f"{self.agent.name}-random", max_new_tokens=self.agent.max_new_tokens,
                          **self.precision)
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(other.agent.model.config).to(other.agent.model.dtype)
        other.agent.model.load_state_dict(fresh.state_dict())
        other.agent.refresh_compute()
        return other


def _answers(model, split: Split, rows: np.ndarray, kind: str, batch_size: int) -> list[str]:
    if isinstance(model, TextModel):
        if kind not in model.kinds:
            raise ValueError(f"a text-format model is evaluated on the action question only, not {kind!r}")
        return [model.answer(split.observation(int(r))) for r in rows]
    stop = "Reason" if kind == "action" else None  # the reason adds nothing to the action metrics
    out = []
    for i in range(0, len(rows), batch_size):
        out += model.answer([split.observation(r) for r in rows[i:i + batch_size]], text.prompt(kind), 24, stop)
    return out


def _nan(x) -> float:
    return float("nan") if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def evaluate_open_loop(model, dataset_split: Split | str | Path, max_samples: int | None = None,
                       batch_size: int = 64, kinds: tuple[str, ...] | None = None) -> dict:
    """Metrics of `model` (a DrivingLLM, or a TextModel: action question only) on a split (a Split, a parquet
    file or a directory holding val.parquet). kinds: the questions to ask (default: all the model answers);
    the metrics of questions not asked are left out."""
    split = dataset_split if isinstance(dataset_split, Split) else load_split(dataset_split, "val")
    kinds = tuple(kinds or getattr(model, "kinds", None) or text.QUESTIONS)
    n = len(split)
    rows = np.arange(n) if not max_samples or max_samples >= n else np.linspace(0, n - 1, max_samples).round().astype(int)
    f = split.frame.iloc[rows]
    model.eval()
    with torch.no_grad():
        answers = {k: _answers(model, split, rows, k, batch_size) for k in text.QUESTIONS if k in kinds}
    m: dict[str, float] = {"n": int(len(rows))}
    if all(k in answers for k in text.PERCEPTION_KINDS):
        m.update(_perception_metrics(answers, f))
    if "action" in answers:
        m.update(_action_metrics(answers["action"], f))
    m["examples"] = {k: v[: 2] for k, v in answers.items()}
    return m


def _perception_metrics(answers: dict[str, list[str]], f) -> dict[str, float]:
    m: dict[str, float] = {}

    # Object counts.
    parsed = [text.parse_objects(a) for a in answers["objects"]]
    cars, peds = f["n_vehicles"].to_numpy(float), f["n_pedestrians"].to_numpy(float)
    m["vehicle_count_error"] = float(np.mean([abs(min(p[0], MAX_VEHICLES) - c) if p else abs(c)
                                              for p, c in zip(parsed, cars)]))
    m["pedestrian_count_error"] = float(np.mean([abs(min(p[1], MAX_PEDESTRIANS) - c) if p else abs(c)
                                                 for p, c in zip(parsed, peds)]))

    # Lead car.
    parsed = [text.parse_lead(a) for a in answers["lead"]]
    lead = [_nan(x) for x in f["lead_distance_m"]]
    has = [not math.isnan(d) for d in lead]
    m["lead_presence_accuracy"] = float(np.mean([p is not None and p[0] == h for p, h in zip(parsed, has)]))
    errors = [abs(p[1] - d) if p and p[0] and p[1] is not None else abs(d) for p, d, h in zip(parsed, lead, has) if h]
    m["lead_distance_error"] = float(np.mean(errors)) if errors else float("nan")

    # Traffic light.
    parsed = [text.parse_light(a) for a in answers["light"]]
    states = [None if math.isnan(_nan(s)) else int(s) for s in f["light_state"]]
    dists = [_nan(x) for x in f["light_distance_m"]]
    m["traffic_light_accuracy"] = float(np.mean([p is not None and p[0] == s for p, s in zip(parsed, states)]))
    errors = [abs(p[1] - d) if p and p[1] is not None else abs(d) for p, d, s in zip(parsed, dists, states) if s is not None]
    m["traffic_light_distance_error"] = float(np.mean(errors)) if errors else float("nan")
    perception_ok = ([text.parse_objects(a) is not None for a in answers["objects"]]
                     + [text.parse_lead(a) is not None for a in answers["lead"]]
                     + [text.parse_light(a) is not None for a in answers["light"]])
    m["perception_parse_rate"] = float(np.mean(perception_ok))
    return m


def _action_metrics(action_answers: list[str], f) -> dict[str, float]:
    parsed = [text.parse_action(a) for a in action_answers]
    lon = ((f["throttle"] - f["brake"]).to_numpy() + 1) / 2
    lat = f["steer"].to_numpy()
    return {
        "lon_control_error": float(np.mean([abs((c.throttle - c.brake + 1) / 2 - y) if c else abs(y)
                                            for c, y in zip(parsed, lon)])),
        "lat_control_error": float(np.mean([abs(c.steer - y) if c else abs(y) for c, y in zip(parsed, lat)])),
        "action_parse_rate": float(np.mean([c is not None for c in parsed])),
    }


def random_model_like(model: DrivingLLM, seed: int = 0) -> DrivingLLM:
    """An untrained model of the same sizes and tokenizer (the contrast row)."""
    torch.manual_seed(seed)
    cfg = DrivingLLMConfig(**{k: v for k, v in model.config.__dict__.items()})
    cfg.preset = f"{model.config.preset}-random"
    return DrivingLLM(cfg, model.tokenizer).eval()


def cmd_eval_open(model_dir: str | Path | None = None, split_dir: str | Path | None = None,
                  max_samples: int | None = 400, with_random: bool = True, device: str = "cpu",
                  dtype: str = "float32") -> dict:
    """CLI entry (`prunedrive eval-open`): open-loop metrics of a trained model (default: the zoo's small model,
    trained if missing) and of a random model of the same size on the held-out split (default: the model's
    own val split). Prints a table, writes <model_dir>/eval_open.json, returns {"trained": ..., "random": ...}.
    device/dtype (models.device): where and in what precision both models answer."""
    from prunedrive.app.train import ensure_default_model
    from prunedrive.models.hf_causal import is_hf_causal_lm_dir

    model_dir = Path(model_dir) if model_dir else ensure_default_model("small")
    text_format = is_hf_causal_lm_dir(model_dir)  # `train --format text`, or any local causal LM
    device, dtype = check_precision(device, dtype)
    model = (TextModel(model_dir, device=device, dtype=dtype) if text_format
             else DrivingLLM.from_pretrained(model_dir).to(device=device, dtype=torch_dtype(dtype)))
    if split_dir is None:
        split_dir = training_data_dir(model_dir)
        if not (Path(split_dir) / "val.parquet").is_file():
            from prunedrive.app.dataset import build_dataset
            from prunedrive.models.presets import get_preset
            build_dataset(split_dir, get_preset("small").data.val_episodes, split="val")
    split = load_split(split_dir, "val")
    results = {"trained": evaluate_open_loop(model, split, max_samples)}
    if with_random:
        random = (model.randomized() if text_format
                  else random_model_like(model).to(device=device, dtype=torch_dtype(dtype)))
        results["random"] = evaluate_open_loop(random, split, max_samples)
    _print(results)
    (model_dir / "eval_open.json").write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="open-loop evaluation (held-out split)")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key, value in results["trained"].items():
        if key != "examples":
            table.add_row(key, *(f"{results[r][key]:.4g}" for r in results))
    Console().print(table)
