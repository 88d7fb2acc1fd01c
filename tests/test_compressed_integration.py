"""Compressed checkpoints end to end (#26): `prune` writes them, every loader reads them, they drive like the dense
layout, the ecosystem's quantized checkpoints drive with --agent text-llm, and `bench --variant` compares the user's
own variants with sizes in every table (bad variants refused before anything drives)."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_compressed import write_quantized
from test_hf_models import VOCAB, _tokenizer

from prunedrive.app.cli import main
from prunedrive.app.train import train
from prunedrive.harness.results import RunDir
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.hf_causal import weight_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# What an episode's result is, apart from timings: the per-episode results compared between layouts.
RESULT_COLUMNS = ["scenario", "seed", "status", "driving_score", "route_completion", "infraction_penalty",
                  "steps"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    train("tiny", out_dir=out / "model", data_dir=out / "model" / "data", progress=False)
    return out / "model"


@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory) -> dict[str, Path]:
    """magnitude 70% written by `prune` in both layouts, and a 2:4 one (compressed)."""
    root = tmp_path_factory.mktemp("pruned")
    base = ["prune", "--method", "magnitude", "--model", str(tiny)]
    assert main([*base, "--sparsity", "0.7", "--model-out", str(root / "c70")]) == 0
    assert main([*base, "--sparsity", "0.7", "--model-out", str(root / "d70"), "--save-dense"]) == 0
    assert main([*base, "--pattern", "2:4", "--model-out", str(root / "nm24")]) == 0
    return {"c70": root / "c70", "d70": root / "d70", "nm24": root / "nm24"}


@pytest.fixture
def short_suite(tiny_suite) -> Path:
    suite = tiny_suite.parent / "short.yaml"
    suite.write_text(tiny_suite.read_text().replace("seeds: [1, 2, 3]", "seeds: [1, 2]").replace(
        "duration_s: 12", "duration_s: 4"))
    return suite


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_prune_writes_70_percent_compressed_smaller_than_save_dense_and_bit_identical(pruned):
    compressed, dense = pruned["c70"], pruned["d70"]
    assert _config(compressed)["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    assert "quantization_config" not in _config(dense)  # --save-dense: today's layout
    # tiny, scope lm: the encoder and the embeddings stay dense (0.82x measured); a dense write would be 1.0x
    assert weight_bytes(compressed) < 0.85 * weight_bytes(dense)
    record = json.loads((compressed / "sparsity.json").read_text())["checkpoint"]
    assert record["layout"] == "compressed" and record["bytes_on_disk"] == weight_bytes(compressed)
    assert record["dense_bytes"] == weight_bytes(dense)  # the same model in the dense layout, byte for byte
    assert record["ratio_to_dense"] == pytest.approx(weight_bytes(compressed) / weight_bytes(dense))
    assert record["execution"] == "decompressed: no kernel" and record["scheme"] == "sparse-bitmask"
    dense_record = json.loads((dense / "sparsity.json").read_text())["checkpoint"]
    assert dense_record["layout"] == "dense" and dense_record["ratio_to_dense"] == 1.0
    assert dense_record["execution"] == "dense kernels"
    a, b = DrivingLLM.from_pretrained(compressed), DrivingLLM.from_pretrained(dense)
    assert a.compression["sparsity_format"] == "sparse-bitmask" and not hasattr(b, "compression")
    want = b.state_dict()
    assert set(a.state_dict()) == set(want)
    for name, tensor in a.state_dict().items():
        assert torch.equal(_bits(tensor), _bits(want[name])), name


def test_the_cache_recipe_tells_the_layouts_apart(tiny):
    from prunedrive.app.prune import recipe

    assert recipe("magnitude", 0.7) != recipe("magnitude", 0.7, save_dense=True)


def test_compressed_and_dense_layouts_drive_identically(pruned, short_suite, tmp_path):
    for layout in ("c70", "d70"):
        assert main(["run", "--suite", str(short_suite), "--agent", "llm", "--model", str(pruned[layout]),
                     "--out", str(tmp_path), "--run-id", layout, "--quiet"]) == 0
    got, want = (RunDir(tmp_path / layout).episodes()[RESULT_COLUMNS].sort_values(["scenario", "seed"])
                 .reset_index(drop=True) for layout in ("c70", "d70"))
    assert len(got) == 2 and (got["steps"] > 0).all()
    pd.testing.assert_frame_equal(got, want)


def test_2_4_prune_is_written_in_the_2_4_format_smaller_than_dense_and_loads(tiny, pruned):
    nm24 = pruned["nm24"]
    assert _config(nm24)["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert weight_bytes(nm24) < weight_bytes(tiny)
    model = DrivingLLM.from_pretrained(nm24)
    weight = model.lm.model.layers[0].mlp.down_proj.weight
    assert ((weight.reshape(-1, 4) != 0).sum(-1) <= 2).all()


def test_a_compressed_model_can_be_pruned_again_and_evaluated_open_loop(tiny, pruned, tmp_path):
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.8", "--model", str(pruned["c70"]),
                 "--data", str(tiny / "data"), "--model-out", str(tmp_path / "c80")]) == 0
    again = DrivingLLM.from_pretrained(tmp_path / "c80")
    assert again.compression["sparsity_format"] == "sparse-bitmask"
    assert weight_bytes(tmp_path / "c80") < weight_bytes(pruned["c70"])
    assert main(["eval-open", "--model", str(pruned["c70"]), "--data", str(tiny / "data"), "--max-samples", "4",
                 "--no-random"]) == 0


def test_structured_methods_stay_dense(tiny, tmp_path):
    assert main(["prune", "--method", "width", "--sparsity", "0.25", "--model", str(tiny), "--model-out",
                 str(tmp_path / "w")]) == 0
    assert "quantization_config" not in _config(tmp_path / "w")
    assert json.loads((tmp_path / "w" / "sparsity.json").read_text())["checkpoint"]["layout"] == "dense"


def _quantized_text_llm(directory: Path, preset: str) -> Path:
    write_quantized(directory, preset, vocab=VOCAB, positions=1024)  # W4A16 groups of 128: hidden 128
    _tokenizer(chat=False).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("preset, fmt", [("W8A8", "int-quantized"), ("W4A16", "pack-quantized")])
def test_library_quantized_llama_drives_with_text_llm_through_the_cli(tmp_path, short_suite, preset, fmt):
    from prunedrive.models.hf_causal import load_causal_lm

    model_dir = _quantized_text_llm(tmp_path / preset, preset)
    model, _ = load_causal_lm(model_dir)
    assert model.compression["quantization_format"] == fmt
    assert model.compression["execution"] == "decompressed: no kernel"
    assert main(["run", "--suite", str(short_suite), "--agent", "text-llm", "--model", str(model_dir), "--out",
                 str(tmp_path / "runs"), "--run-id", preset, "--quiet", "--agent-arg", "max_new_tokens=4"]) == 0
    episodes = RunDir(tmp_path / "runs" / preset).episodes()
    assert len(episodes) == 2 and (episodes["status"] != "failed").all()


def test_bench_with_user_variants_gives_the_tables_with_sizes(tiny, pruned, short_suite, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny), "--suite", str(short_suite), "--variant", f"a={pruned['c70']}",
                 "--variant", f"b={pruned['nm24']}", "--out", str(tmp_path), "--run-id", "b", "--quiet"]) == 0
    out = capsys.readouterr().out
    for header in ("Closed loop", "Cost and open loop", "Checkpoints", "decompressed: no kernel", "dense kernels",
                   "sparse-bitmask"):
        assert header in out, header
    table = pd.read_csv(tmp_path / "b" / "bench.csv").set_index("agent")
    assert set(table.index) == {"llm-dense", "a", "b", "expert"}  # only the user's variants: nothing pruned here
    assert table.loc["llm-dense", "ratio_to_dense"] == 1.0
    assert table.loc["a", "bytes_on_disk"] == weight_bytes(pruned["c70"])
    assert table.loc["a", "ratio_to_dense"] == pytest.approx(weight_bytes(pruned["c70"]) / weight_bytes(tiny))
    assert table.loc["a", "parameters_stored"] == table.loc["llm-dense", "parameters_stored"]  # zeros included
    assert table.loc["a", "nonzero_params"] < table.loc["llm-dense", "nonzero_params"]
    assert table.loc["b", "scheme"] == "sparse-24-bitmask" and table.loc["llm-dense", "execution"] == "dense kernels"
    assert pd.notna(table.loc["a", "ds_diff"]) or table.loc["a", "n"] < 2
    checkpoints = RunDir(tmp_path / "b").attachments()["checkpoints"]
    assert checkpoints.load()["a"]["bytes_on_disk"] == weight_bytes(pruned["c70"])
    from prunedrive.report.data import load_series
    from prunedrive.report.tables import comparison_table

    columns, rows = comparison_table(load_series([tmp_path / "b"]))
    assert ("disk_ratio", "× dense bytes") in columns
    by_agent = {row["agent"]: row for row in rows}
    assert by_agent["a"]["disk_ratio"] == f"{weight_bytes(pruned['c70']) / weight_bytes(tiny):.3f}"
    assert by_agent["a"]["method"] == "variant"


def _pickles_only(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")


def _no_config(directory: Path) -> None:
    (directory / "config.json").unlink()


def _unsupported_scheme(directory: Path) -> None:
    config = _config(directory)
    config["quantization_config"]["sparsity_config"]["format"] = "marlin-24"
    (directory / "config.json").write_text(json.dumps(config))


def _other_architecture(directory: Path) -> None:
    config = _config(directory)
    config["hidden_size"] = config["hidden_size"] * 2
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("spoil, says", [
    (_no_config, "config.json is missing"),
    (_pickles_only, "only safetensors weights are loaded"),
    (_unsupported_scheme, "sparsity_config.format is 'marlin-24', not supported"),
    (_other_architecture, "not a variant of the dense model: hidden size"),
])
def test_a_bad_variant_is_refused_before_anything_drives(tiny, pruned, short_suite, tmp_path, capsys, spoil, says):
    bad = shutil.copytree(pruned["c70"], tmp_path / "bad")
    spoil(bad)
    code = main(["bench", "--model", str(tiny), "--suite", str(short_suite), "--variant", f"good={pruned['nm24']}",
                 "--variant", f"bad={bad}", "--out", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and str(bad) in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing was driven


@pytest.mark.parametrize("argv, says", [
    (["--variant", "no-equals-sign"], "expected NAME=DIR"),
    (["--variant", "bad/name=x"], "an agent name is 1-128 letters"),
    (["--variant", "llm-dense=x"], "an agent name the bench uses itself"),
    (["--variant", "a=x", "--variant", "A=y"], "given twice"),
    (["--methods", "none", "owl"], "--methods none cannot be combined"),
])
def test_bad_variant_options_are_refused(tiny, short_suite, tmp_path, capsys, argv, says):
    code = main(["bench", "--model", str(tiny), "--suite", str(short_suite), *argv, "--out", str(tmp_path / "r"),
                 "--quiet"])
    assert code == 2 and says in capsys.readouterr().err
