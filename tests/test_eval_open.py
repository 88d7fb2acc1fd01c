"""Open-loop metrics on scripted answers: the expert's own answers score perfectly, unparsable answers cost
|label|, and an absurd count is clipped to the observation's slots."""
import numpy as np
import pytest

from prunedrive.harness.observation import MAX_VEHICLES
from prunedrive.app import eval_open
from prunedrive.models import text
from prunedrive.models.data import synthetic_split


@pytest.fixture(scope="module")
def split():
    return synthetic_split(12, seed=3)


class AnswersOnly:
    """No network: every answer comes from `scripted`; evaluate_open_loop only calls eval() on the model."""

    def eval(self):
        return self


def scripted(monkeypatch, answer):
    """Replace the model's answers with answer(kind, row_index, split) for every question."""
    monkeypatch.setattr(eval_open, "_answers",
                        lambda model, split, rows, kind, batch_size: [answer(kind, r, split) for r in rows])


def test_the_expert_answers_score_perfectly(monkeypatch, split):
    scripted(monkeypatch, lambda kind, r, s: s.frame[f"a_{kind}"].iloc[r])
    m = eval_open.evaluate_open_loop(model=AnswersOnly(), dataset_split=split)
    assert m["n"] == 12
    assert m["vehicle_count_error"] == m["pedestrian_count_error"] == 0.0
    assert m["lon_control_error"] < 0.01 and m["lat_control_error"] < 0.01  # pedals and steering in whole percent
    assert m["lead_presence_accuracy"] == m["traffic_light_accuracy"] == 1.0
    assert m["action_parse_rate"] == m["perception_parse_rate"] == 1.0


def test_unparsable_answers_cost_the_label(monkeypatch, split):
    scripted(monkeypatch, lambda kind, r, s: "the the the")
    m = eval_open.evaluate_open_loop(AnswersOnly(), split)
    f = split.frame
    assert m["vehicle_count_error"] == pytest.approx(f["n_vehicles"].mean())
    assert m["lat_control_error"] == pytest.approx(f["steer"].abs().mean())
    lon = ((f["throttle"] - f["brake"]) + 1) / 2
    assert m["lon_control_error"] == pytest.approx(lon.mean())
    assert m["action_parse_rate"] == m["perception_parse_rate"] == 0.0


def test_an_absurd_count_is_clipped_to_the_slots(monkeypatch, split):
    scripted(monkeypatch, lambda kind, r, s: text.objects_answer(555_555_555, 0) if kind == "objects"
             else s.frame[f"a_{kind}"].iloc[r])
    m = eval_open.evaluate_open_loop(AnswersOnly(), split)
    assert m["vehicle_count_error"] == pytest.approx(np.mean(MAX_VEHICLES - split.frame["n_vehicles"]))
    assert m["pedestrian_count_error"] == pytest.approx(split.frame["n_pedestrians"].mean())
