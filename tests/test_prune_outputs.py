"""Pruning never destroys what it reads, one prune writes an output at a time, and calibration fits the model.

- `--model-out` equal to, inside or around the input model or its data is refused (exit 2) before anything
  is loaded or removed (symlinks followed); the bench's cache `<dense>/pruned/<recipe>` is the one place
  inside the model directory an output may go.
- A second prune into a busy `--model-out` fails at once (exit 2, naming the directory); a killed prune's lock
  (flock, released by the kernel) blocks nothing; benches of one model at once prune a recipe once.
- A Hugging Face model's calibration and DG2PF sequences are cut to its context (GPT-2's n_positions, OPT's
  max_position_embeddings), and sparsity.json counts the cut samples; our DrivingLLM's rotary Llama is
  calibrated on its whole sequences.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch

import prunedrive.app.prune_driving as compress
from prunedrive.app.bench import prune_variants
from prunedrive.app.cli import main
from prunedrive.app.prune import prune_model_dir
from prunedrive.app.prune_driving import calibration_with_source
from prunedrive.models.data import synthetic_split
from prunedrive.models.pruning.calibration import capture_block_inputs, fit_to_context
from prunedrive.models.driving_llm import DrivingLLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_split(split, path):
    from prunedrive.app.dataset import _to_table

    rows = [{**{f"obs_{k}": v[i].ravel() for k, v in split.obs.items()}, **split.frame.iloc[i].to_dict()}
            for i in range(len(split))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_to_table(rows), path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Driving data without a simulator: synthetic observations with expert-style answers, as parquet."""
    path = tmp_path_factory.mktemp("data")
    _write_split(synthetic_split(12, seed=1), path / "train.parquet")
    _write_split(synthetic_split(8, seed=2), path / "val.parquet")
    return path


@pytest.fixture
def parent(tmp_path, data_dir):
    """<tmp>/parent/dense: an untrained tiny DrivingLLM with its own data/ (what the hostile tester deleted)."""
    from prunedrive.app.train import untrained_model
    from prunedrive.models.presets import PRESETS

    dense = tmp_path / "parent" / "dense"
    untrained_model(PRESETS["tiny"], synthetic_split(8, seed=1)).save_pretrained(dense)
    (dense / "data").mkdir()
    (dense / "data" / "train.parquet").write_bytes((data_dir / "train.parquet").read_bytes())
    return dense.parent


def _prune(model, out, *extra):
    return main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--model", str(model),
                 "--model-out", str(out), *extra])


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# -- 1. outputs that would destroy inputs ------------------------------------------------------------------------
def test_an_output_holding_the_input_model_is_refused_and_nothing_is_deleted(parent, capsys):
    dense = parent / "dense"
    before = _files(dense)
    (parent / "link").symlink_to(parent, target_is_directory=True)
    for out in (parent, parent / "link", dense, dense / "data", parent / "link" / "dense" / "x"):
        assert _prune(dense, out, "--overwrite") == 2, out
        err = capsys.readouterr().err
        assert str(out) in err and str(dense) in err and "input model directory" in err, err
    assert _files(dense) == before and not list(parent.glob(".*partial"))


def test_an_output_holding_the_data_is_refused(parent, tmp_path, data_dir, capsys):
    dense = parent / "dense"
    copy = tmp_path / "elsewhere" / "data"
    copy.mkdir(parents=True)
    (copy / "train.parquet").write_bytes((data_dir / "train.parquet").read_bytes())
    assert _prune(dense, copy.parent, "--overwrite", "--data", str(copy)) == 2
    assert "data directory" in capsys.readouterr().err and (copy / "train.parquet").is_file()
    # The data the model was trained on (train_summary.json) counts as read even without --data.
    (dense / "train_summary.json").write_text(json.dumps({"data_dir": str(copy)}))
    assert _prune(dense, copy, "--overwrite") == 2
    assert str(copy) in capsys.readouterr().err and (copy / "train.parquet").is_file()


def test_the_pruned_cache_inside_the_model_directory_is_allowed(parent):
    dense = parent / "dense"
    assert _prune(dense, dense / "pruned" / "magnitude-0.5") == 0
    assert (dense / "pruned" / "magnitude-0.5" / "sparsity.json").is_file()
    assert DrivingLLM.from_pretrained(dense)  # the dense model is whole


@pytest.mark.parametrize("layout", [[], ["--save-dense"]])
def test_a_pruned_model_and_its_files_get_the_umasks_modes_not_private_temp_ones(parent, layout):
    """Written under mkstemp/mkdtemp names and renamed: without a chmod they stayed 0600 files in a 0700 directory."""
    old = os.umask(0o022)
    try:
        assert _prune(parent / "dense", parent / "out", *layout) == 0
    finally:
        os.umask(old)
    out = parent / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "sparsity.json"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


# -- 2. one prune per output ---------------------------------------------------------------------------------------
def _holding_first_prune(monkeypatch):
    """Make the first `prune` call wait until released: (started, release) events."""
    started, release, real = threading.Event(), threading.Event(), compress.prune
    first = {"taken": False}

    def prune(*args, **kwargs):
        if not first["taken"]:
            first["taken"] = True
            started.set()
            assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(compress, "prune", prune)
    return started, release


def test_a_second_prune_into_a_busy_output_fails_clearly(parent, tmp_path, monkeypatch, capsys):
    started, release = _holding_first_prune(monkeypatch)
    out, results = tmp_path / "out", {}
    first = threading.Thread(target=lambda: results.setdefault("first", _prune(parent / "dense", out)))
    first.start()
    try:
        assert started.wait(60)
        partials = list(tmp_path.glob(".out.*.partial"))
        assert len(partials) == 1  # a name of its own, not a fixed .out.partial another prune shares
        assert _prune(parent / "dense", out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert str(out) in err and "another prune holds it" in err
    finally:
        release.set()
        first.join(60)
    assert results["first"] == 0 and (out / "sparsity.json").is_file()
    assert not list(tmp_path.glob(".out.*.partial"))


def test_a_killed_prunes_lock_and_partial_directory_block_nothing(parent, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from prunedrive.harness import locks; "
        f"assert locks.acquire(Path({str(tmp_path / '.out.lock')!r}), wait=False) is not None; "
        "print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match="another prune holds it"):
            prune_model_dir(parent / "dense", "magnitude", 0.5, out, progress=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    stale = tmp_path / ".out.0123456789ab.abc_12.partial"  # a killed prune of other settings
    stale.mkdir()
    record = prune_model_dir(parent / "dense", "magnitude", 0.5, out, progress=False)
    assert record["method"] == "magnitude" and (out / "sparsity.json").is_file() and not stale.exists()


def test_benches_of_one_model_at_once_prune_each_recipe_once(parent, monkeypatch):
    calls, real = [], compress.prune
    started = threading.Event()

    def slow_prune(*args, **kwargs):
        calls.append(1)
        started.set()
        time.sleep(1.0)  # the other bench arrives while this one prunes
        return real(*args, **kwargs)

    monkeypatch.setattr(compress, "prune", slow_prune)
    dense, results = parent / "dense", {}
    variants = {"llm-magnitude-0.5": {"method": "magnitude", "sparsity": 0.5}}
    first = threading.Thread(target=lambda: results.setdefault("first", prune_variants(dense, variants, False)))
    first.start()
    assert started.wait(60)
    second = prune_variants(dense, variants, False)
    first.join(60)
    assert len(calls) == 1
    path = second["llm-magnitude-0.5"].directory
    assert results["first"]["llm-magnitude-0.5"].directory == path and path.parent == dense / "pruned"
    assert json.loads((path / "sparsity.json").read_text())["method"] == "magnitude"
    assert DrivingLLM.from_pretrained(path)


# -- 4. calibration within the model's context ---------------------------------------------------------------------
def test_fit_to_context_cuts_every_positional_input():
    samples = [{"input_ids": torch.arange(10)[None], "attention_mask": torch.ones(1, 10, dtype=torch.long)},
               {"inputs_embeds": torch.zeros(1, 3, 4), "attention_mask": torch.ones(1, 3, dtype=torch.long)}]
    cut, n = fit_to_context(samples, 4)
    assert n == 1 and cut[0]["input_ids"].tolist() == [[0, 1, 2, 3]] and cut[0]["attention_mask"].shape == (1, 4)
    assert cut[1] is samples[1] and fit_to_context(samples, None) == (samples, 0)


def test_the_driving_llm_is_calibrated_on_its_whole_sequences(parent, data_dir):
    """Its Llama has rotary positions and trains and drives past the config's nominal max_position_embeddings:
    cutting there would calibrate on other inputs than it sees (and change the default recipes' products)."""
    from prunedrive.models.data import lm_calibration_samples, load_split

    model = DrivingLLM.from_pretrained(parent / "dense")
    whole = lm_calibration_samples(model, load_split(data_dir, "train"), n_samples=6, seed=0)
    model.lm.config.max_position_embeddings = min(s["inputs_embeds"].shape[1] for s in whole) - 1
    samples, detail = calibration_with_source(model, "driving", 6, data_dir, 0)
    assert detail["truncated"] == 0
    assert all(torch.equal(a["inputs_embeds"], b["inputs_embeds"]) for a, b in zip(samples, whole))
    capture_block_inputs(model.lm, samples)  # rotary: longer than the nominal context is fine


def test_a_sample_past_a_learned_position_table_is_a_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_short_context("gpt2", 64, tmp_path))
    with pytest.raises(ValueError, match="has 100 positions; GPT2LMHeadModel takes 64"):
        capture_block_inputs(model, [{"input_ids": torch.zeros(1, 100, dtype=torch.long)}])


def _short_context(arch: str, positions: int, root):
    from test_hf_models import HEADS, HIDDEN, LAYERS, VOCAB, _tokenizer
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    ids = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = (GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=positions, **ids) if arch == "gpt2"
              else OPTConfig(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             word_embed_proj_dim=HIDDEN, max_position_embeddings=positions, **ids))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / arch)
    _tokenizer(chat=False).save_pretrained(root / arch)
    return root / arch


@pytest.mark.parametrize("arch, positions", [("gpt2", 64), ("opt", 48)])
def test_a_short_context_hf_model_prunes_and_counts_its_cut_samples(arch, positions, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    model_dir = _short_context(arch, positions, tmp_path)
    record = prune_model_dir(model_dir, "wanda", 0.5, tmp_path / "wanda", n_calibration=4, data_dir=data_dir,
                             progress=False)
    saved = json.loads((tmp_path / "wanda" / "sparsity.json").read_text())
    assert saved["calibration_truncated"] == record["calibration_truncated"] == 4  # the scene prompts are longer
    assert f"4 cut to the model's {positions} positions" in saved["calibration"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "wanda", local_files_only=True, use_safetensors=True)


def test_dg2pf_on_a_short_context_hf_model_cuts_its_training_sequences(tmp_path, data_dir):
    model_dir = _short_context("gpt2", 64, tmp_path)
    record = prune_model_dir(model_dir, "dg2pf", 0.5, tmp_path / "dg2pf", n_calibration=8, data_dir=data_dir,
                             progress=False, sparsity_epochs=1, max_epochs=1, finetune_max_epochs=1)
    assert record["calibration_truncated"] == 12  # 8 training + 4 validation sequences, all longer than 64
    assert "cut to the model's 64 positions" in record["calibration"]


def test_the_training_data_is_found_whatever_the_directory_the_command_runs_in(tmp_path, monkeypatch):
    """Training records its data directory absolute; the shipped model records its own "data"; a model trained
    before that recorded the path as given, relative to where it was trained (`--model-out trained` from a
    project folder wrote "trained/data", which must not become trained/trained/data)."""
    from pathlib import Path

    from prunedrive.app.prune_driving import training_data_dir

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "trained"
    (model / "data").mkdir(parents=True)
    for recorded, expected in ((str(model / "data"), model / "data"), ("data", model / "data"),
                               ("trained/data", Path("trained/data"))):
        (model / "train_summary.json").write_text(json.dumps({"data_dir": recorded}))
        assert training_data_dir(Path("trained")).resolve() == expected.resolve(), recorded
