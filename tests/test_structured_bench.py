"""Structured methods (width, owl-width, depth) through the pipelines: prune_model_dir on the trained tiny driving
LLM (a smaller model, recorded at matched parameter counts), its distilled recovery training at the --finetune
budget, and `prunedrive bench` on a tiny suite with stored parameters and the step-time ratio to dense."""
import json

import pandas as pd
import pytest
import torch

from prunedrive.app import prune_driving as compress
from prunedrive.app.prune import prune_model_dir, recipe
from prunedrive.models.driving_llm import DrivingLLM, collate
from prunedrive.models.data import load_split
from prunedrive.models.pruning.masks import find_linears
from test_compress import tiny_model  # noqa: F401 -- module fixture: the trained tiny driving LLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prunable(model: DrivingLLM) -> int:
    """The LM's prunable parameters: its decoder blocks' linears."""
    return sum(lin.weight.numel() for lin in find_linears(model.lm.model.layers).values())


@pytest.mark.parametrize("method", ["width", "owl-width", "depth"])
def test_structured_prune_writes_a_smaller_driving_llm_that_drives(tiny_model, tmp_path, method):
    dense = DrivingLLM.from_pretrained(tiny_model)
    record = prune_model_dir(tiny_model, method, 0.5, tmp_path / method, n_calibration=8, progress=False)
    model = DrivingLLM.from_pretrained(tmp_path / method)
    saved = json.loads((tmp_path / method / "sparsity.json").read_text())
    assert saved["method"] == method and saved["structure"]["parameters_after"] < saved["structure"]["parameters_before"]
    assert record["parameters"] == model.num_parameters()
    assert model.num_parameters()["lm"] < dense.num_parameters()["lm"]
    assert model.num_parameters()["encoder"] == dense.num_parameters()["encoder"]  # scope lm: the encoder stays
    # Matched parameter counts: 50% means half of the LM's prunable parameters (width, uniform) or of its blocks.
    if method == "width":
        assert prunable(model) / prunable(dense) == pytest.approx(0.5, abs=0.02)
    if method == "depth":
        assert len(model.lm.model.layers) == len(dense.lm.model.layers) // 2
    assert record["lm_global"] < 0.05  # not masks: a smaller dense model
    split = load_split(tiny_model / "data", "val")
    ids, _ = model.generate(collate([split.observation(i) for i in range(2)]), "What should you do?", 4)
    assert len(ids) == 2


FAST = {"sparsity_epochs": 1, "max_epochs": 2, "finetune_max_epochs": 1, "train_batches": 2, "val_batches": 2,
        "batch_size": 8}


def test_structured_recovery_is_distilled_from_the_dense_model_at_the_finetune_budget(tiny_model, tmp_path,
                                                                                       monkeypatch):
    teachers = []
    real = compress.dg2pf_prune

    def spy(student, teacher, *args, **kwargs):
        teachers.append((teacher, kwargs.get("fixed_mask"), kwargs["config"]))
        return real(student, teacher, *args, **kwargs)

    monkeypatch.setattr(compress, "dg2pf_prune", spy)
    record = prune_model_dir(tiny_model, "width", 0.5, tmp_path / "tuned", n_calibration=8, progress=False,
                             finetune=FAST)
    (teacher, fixed_mask, config), = teachers
    assert fixed_mask is None and config.distill and config.gradual and config.sparsity == 0.0
    # the teacher is the dense model, of another shape than the student
    assert teacher.num_parameters()["lm"] > DrivingLLM.from_pretrained(tmp_path / "tuned").num_parameters()["lm"]
    tuned = record["finetune"]
    assert tuned["distilled_from"] == str(tiny_model) and tuned["epochs"]["gradual"] >= 1
    assert tuned["config"]["sparsity"] == 0.0 and record["lm_global"] < 0.05  # training added no zeros
    # the same epoch budget as a one-shot method's --finetune
    budget = compress.recovery_config("lm", True)
    assert budget.max_epochs + budget.finetune_max_epochs == compress.finetune_config("lm", True).finetune_max_epochs
    assert recipe("width", 0.5, finetune=True)["finetune"]["distill"] is True
    assert recipe("width", 0.5, finetune=True) != recipe("width", 0.5)


def test_bench_drives_structured_beside_unstructured_with_stored_params_and_step_ratio(tiny_model, tiny_suite,
                                                                                       tmp_path, capsys):
    from prunedrive.app.cli import main

    suite = tiny_suite.parent / "one.yaml"
    suite.write_text(tiny_suite.read_text().replace("seeds: [1, 2, 3]", "seeds: [1]").replace("duration_s: 12",
                                                                                             "duration_s: 2"))
    assert main(["bench", "--model", str(tiny_model), "--suite", str(suite), "--methods", "width", "depth",
                 "magnitude", "--sparsities", "0.5", "--out", str(tmp_path / "results"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "llm-width-0.5" in out and "llm-depth-0.5" in out and "x dense" in " ".join(out.split())
    run = next((tmp_path / "results").iterdir())
    table = pd.read_csv(run / "bench.csv").set_index("agent")
    dense, width = table.loc["llm-dense"], table.loc["llm-width-0.5"]
    magnitude, depth = table.loc["llm-magnitude-0.5"], table.loc["llm-depth-0.5"]
    assert width.params < dense.params and depth.params < dense.params  # structured: fewer stored
    assert magnitude.params == dense.params and magnitude.nonzero_params < dense.nonzero_params  # masks
    assert dense.step_ratio == 1.0
    for row in (width, depth, magnitude):
        assert row.step_ratio == pytest.approx(row.step_ms_p50 / dense.step_ms_p50)
    assert not torch.isfinite(torch.tensor(table.loc["expert", "step_ratio"]))
