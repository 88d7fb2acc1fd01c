"""Pruning a trained model directory end to end: the output loads, holds its zeros, says what it did."""
import json

import pytest

from prunedrive.app.compress import prune_model_dir
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.pruning import sparsity_report
from prunedrive.app.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    train("tiny", out_dir=out / "model", data_dir=out / "model" / "data", progress=False)
    return out / "model"


@pytest.mark.parametrize("method, pattern", [("magnitude", None), ("wanda", "2:4"), ("owl", None), ("sparsegpt", None)])
def test_pruned_directory_loads_with_its_zeros(tiny_model, tmp_path, method, pattern):
    out = tmp_path / method
    record = prune_model_dir(tiny_model, method, None if pattern else 0.5, out, pattern=pattern, n_calibration=8,
                             progress=False)
    model = DrivingLLM.from_pretrained(out)
    lm = sparsity_report(model.lm)
    assert lm["global"] == pytest.approx(0.5, abs=0.02)
    assert record["lm_global"] == pytest.approx(lm["global"])
    assert sparsity_report(model.encoder)["global"] < 0.05  # scope "lm" leaves the encoder dense
    saved = json.loads((out / "sparsity.json").read_text())
    assert saved["method"] == method and saved["per_layer"]
    if method == "owl":
        assert len(saved["layer_sparsities"]) == len(model.lm.model.layers)
    if method != "magnitude":
        assert saved["calibration"].startswith("driving")


def test_scope_all_prunes_the_encoder_too(tiny_model, tmp_path):
    prune_model_dir(tiny_model, "wanda", 0.5, tmp_path / "all", scope="all", n_calibration=8, progress=False)
    model = DrivingLLM.from_pretrained(tmp_path / "all")
    assert sparsity_report(model.encoder)["global"] == pytest.approx(0.5, abs=0.05)


def test_generic_calibration_is_recorded(tiny_model, tmp_path):
    record = prune_model_dir(tiny_model, "wanda", 0.5, tmp_path / "g", calibration="generic", n_calibration=8,
                             progress=False)
    assert record["calibration"].startswith("generic")


def test_dg2pf_reaches_the_target(tiny_model, tmp_path):
    record = prune_model_dir(tiny_model, "dg2pf", 0.5, tmp_path / "d", progress=False)
    model = DrivingLLM.from_pretrained(tmp_path / "d")
    assert sparsity_report(model.lm)["global"] == pytest.approx(0.5, abs=0.02)
    assert record["hyperparameters"]["temperature"] == 4.0


def test_bad_method_and_scope_are_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown pruning method 'owls'; allowed: magnitude, wanda"):
        prune_model_dir(tiny_model, "owls", 0.5, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown scope"):
        prune_model_dir(tiny_model, "wanda", 0.5, tmp_path / "x", scope="encoder")
