"""--device and --dtype (models.device): parsing and refusals, the CPU paths (bfloat16 driving and pruning, block
offload with the device "cpu"), and, marked `cuda`, the GPU paths: `pytest -q tests/test_device.py -m cuda`."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prunedrive.agents.llm import LLMAgent
from prunedrive.agents.registry import AgentSpec
from prunedrive.app.cli import main
from prunedrive.app.prune import prune_model_dir, recipe
from prunedrive.app.run import run_precision, with_precision
from prunedrive.app.train import untrained_model
from prunedrive.harness.compute import COMPUTE_FIELDS, aggregate, split_device_time
from prunedrive.harness.observation import OBS_SHAPES
from prunedrive.harness.results import RunError
from prunedrive.models import device as dev
from prunedrive.models.data import synthetic_split
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.presets import PRESETS
from prunedrive.models.pruning import calibration
from prunedrive.scenarios.loader import Scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")


def _write_split(split, path):
    """A Split as `<dir>/<name>.parquet`, the layout models.data.load_split reads."""
    columns = {f"obs_{k}": pa.array([row.ravel() for row in split.obs[k]]) for k in OBS_SHAPES}
    table = pa.Table.from_pandas(split.frame, preserve_index=False)
    for name, column in columns.items():
        table = table.append_column(name, column)
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An untrained tiny driving LLM with a data directory (train and val splits): enough to drive and prune."""
    root = tmp_path_factory.mktemp("device")
    split = synthetic_split(16, seed=1)
    model = untrained_model(PRESETS["tiny"], split)
    model.save_pretrained(root / "tiny")
    (root / "tiny" / "data").mkdir()
    _write_split(split, root / "tiny" / "data" / "train.parquet")
    _write_split(synthetic_split(8, seed=2), root / "tiny" / "data" / "val.parquet")
    return root / "tiny"


# -- parsing and refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, canonical", [("cpu", "cpu"), ("CUDA", "cuda"), ("cuda:0", "cuda:0"),
                                             ("cuda:007", "cuda:7"), (" cpu ", "cpu")])
def test_device_spellings(text, canonical):
    assert dev.parse_device(text) == canonical


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "mps", "cpu:0", "", None, "cuda:1:2"])
def test_a_bad_device_lists_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=r"--device .*allowed: cpu, cuda, cuda:N"):
        dev.parse_device(bad)


@pytest.mark.parametrize("bad", ["float64", "fp16", "half", "int8", None])
def test_a_bad_dtype_lists_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="--dtype .*allowed: float32, bfloat16, float16"):
        dev.parse_dtype(bad)


def test_float16_is_refused_on_the_cpu_and_bfloat16_is_not():
    with pytest.raises(ValueError, match="float16 on --device cpu: refused"):
        dev.check_precision("cpu", "float16")
    assert dev.check_precision("cpu", "bfloat16") == ("cpu", "bfloat16")
    assert dev.torch_dtype("bfloat16") is torch.bfloat16


@no_cuda
def test_cuda_is_refused_where_it_is_absent():
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available here .*use --device cpu"):
        dev.check_device("cuda:1")


def test_the_cpu_has_no_device_clock_or_peak():
    with dev.DeviceClock("cpu") as clock:
        torch.ones(4) @ torch.ones(4)
    assert math.isnan(clock.seconds) and math.isnan(dev.peak_memory_bytes("cpu"))
    dev.reset_peak_memory("cpu")  # a no-op, not an error
    assert dev.fits_on_device(1 << 60, "cpu")


@no_cuda
@pytest.mark.parametrize("argv", [
    ["run", "--suite", "smoke", "--agent", "expert"],
    ["bench", "--suite", "smoke"],
    ["claims", "--suite", "smoke", "--quick"],
    ["prune", "--method", "magnitude", "--sparsity", "0.5", "--model-out", "OUT"],
    ["eval-open"],
])
def test_cli_refuses_cuda_without_cuda_before_anything_runs(argv, tiny_dir, tmp_path, capsys):
    """Wrong variant: a command that trains, prunes or drives first and fails on the device later."""
    argv = [a.replace("OUT", str(tmp_path / "pruned")) for a in argv]
    if argv[0] in ("run", "bench", "claims"):
        argv += ["--out", str(tmp_path / "results")]
    if argv[0] in ("prune", "eval-open"):
        argv += ["--model", str(tiny_dir)]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "pruned").exists()


def test_cli_refuses_float16_on_the_cpu_and_unknown_dtypes(tiny_dir, tmp_path, capsys):
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--model", str(tiny_dir), "--model-out",
                 str(tmp_path / "p"), "--dtype", "float16"]) == 2
    assert "float16 on --device cpu: refused" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--dtype", "float64", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "float32" in capsys.readouterr().err and not (tmp_path / "p").exists()
    with pytest.raises(SystemExit):
        main(["run", "--device", "gpu", "--out", str(tmp_path)])
    assert "allowed: cpu, cuda, cuda:N" in capsys.readouterr().err


# -- the agents and the specs -----------------------------------------------------------------------------------------
def test_only_agents_that_take_a_precision_get_it_and_only_when_not_the_default():
    expert, llm = AgentSpec("expert"), AgentSpec("llm", "/m", None, (("max_new_tokens", 4),))
    assert with_precision([expert, llm], "cpu", "float32") == [expert, llm]  # a default run records what it did
    out = with_precision([expert, llm], "cpu", "bfloat16")
    assert out[0] == expert and dict(out[1].args) == {"max_new_tokens": 4, "dtype": "bfloat16"}
    with pytest.raises(RunError, match="--agent-arg dtype=float16 disagrees with --dtype bfloat16"):
        with_precision([AgentSpec("llm", "/m", None, (("dtype", "float16"),))], "cpu", "bfloat16")


def test_a_resume_takes_its_runs_precision_and_refuses_another(tmp_path):
    assert run_precision({}, None, None, None) == ("cpu", "float32")
    assert run_precision({"dtype": "bfloat16"}, None, None, tmp_path) == ("cpu", "bfloat16")
    assert run_precision({}, None, None, tmp_path) == ("cpu", "float32")  # runs from before the option
    with pytest.raises(RunError, match="--dtype float32: .* was driven with dtype bfloat16"):
        run_precision({"dtype": "bfloat16"}, None, "float32", tmp_path)
    with pytest.raises(RunError, match="--dtype bfloat16: .* was driven with dtype float32"):
        run_precision({}, None, "bfloat16", tmp_path)


def test_bfloat16_agent_runs_in_bfloat16_on_the_cpu_and_reports_no_device_figures(tiny_dir):
    assert dev.device_figures("cpu", 1.0) == {}
    agent = LLMAgent(str(tiny_dir), max_new_tokens=4, dtype="bfloat16")
    assert {p.dtype for p in agent.model.parameters()} == {torch.bfloat16}
    agent.reset(Scenario(name="s", kind="highway_cruise"))
    split = synthetic_split(3, seed=4)
    agent.act(split.observation(0))
    report = agent.last_compute()
    assert set(report) <= set(COMPUTE_FIELDS)
    assert "device_time_s" not in report and "device_peak_mem_bytes" not in report  # the runner's NaN
    agent.configure_batch(3)
    agent.act_batch([split.observation(i) for i in range(3)])
    assert all("device_time_s" not in r for r in agent.last_compute_batch())
    with pytest.raises(ValueError, match="dtype float16 on device cpu: refused"):
        LLMAgent(str(tiny_dir), dtype="float16")


def test_a_path_without_a_kernel_for_the_dtype_is_rejected_not_fatal():
    """CPU csr has no bfloat16 kernel: sparse="auto" must measure the others and say why, not crash the agent."""
    from prunedrive.models.sparse_linear import choose_path

    linear = torch.nn.Linear(32, 16).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    choice = choose_path(linear, (1, 4), rounds=1, number=1)
    assert "unavailable" in choice.rejected["csr"] and "csr" not in choice.times_us
    assert "dense" in choice.times_us and choice.path in choice.times_us
    # ell runs in bfloat16 and agrees within the dtype's rounding (a float32 tolerance would reject it).
    assert "ell" in choice.times_us, choice.rejected


def test_batched_device_time_is_split_like_the_flops_and_aggregated():
    rows = [{"dense_flops": 1.0}, {"dense_flops": 3.0}]
    split_device_time(rows, 0.8)
    assert [r["device_time_s"] for r in rows] == pytest.approx([0.2, 0.6])
    columns = {name: np.array([np.nan, np.nan]) for name in COMPUTE_FIELDS}
    columns.update(device_time_s=np.array([0.2, 0.6]), device_peak_mem_bytes=np.array([5.0, 7.0]))
    out = aggregate(columns)
    assert out["device_time_s_mean"] == pytest.approx(0.4) and out["device_peak_mem_bytes"] == 7.0


def test_leaderboard_config_checks_the_precision(tmp_path):
    from prunedrive.agents.leaderboard_agent import PrunedriveAgent

    path = tmp_path / "agent.yaml"
    assert PrunedriveAgent._precision({"dtype": "bfloat16"}, {}, path) == {"dtype": "bfloat16"}
    assert PrunedriveAgent._precision({}, {}, path) == {}
    with pytest.raises(ValueError, match=f"{path}: dtype float16 on {path}: device cpu: refused"):
        PrunedriveAgent._precision({"dtype": "float16"}, {}, path)
    with pytest.raises(ValueError, match="dtype is given twice"):
        PrunedriveAgent._precision({"dtype": "bfloat16"}, {"dtype": "bfloat16"}, path)


# -- driving in bfloat16 through the CLI, and resuming ----------------------------------------------------------------
def test_bfloat16_drives_a_suite_records_its_dtype_and_refuses_a_resume_in_another(tiny_dir, tiny_suite, tmp_path,
                                                                                    capsys):
    base = ["--out", str(tmp_path), "--quiet"]
    assert main(["run", "--suite", str(tiny_suite), "--seeds", "1", "--agent", "llm", "--model", str(tiny_dir),
                 "--agent-arg", "max_new_tokens=3", "--dtype", "bfloat16", "--run-id", "bf", *base]) == 0
    manifest = json.loads((tmp_path / "bf" / "manifest.json").read_text())
    assert manifest["config"]["dtype"] == "bfloat16" and manifest["config"]["device"] == "cpu"
    assert dict(map(tuple, manifest["config"]["specs"][0]["args"]))["dtype"] == "bfloat16"
    assert main(["run", "--resume", "bf", "--dtype", "float32", *base]) == 2
    assert "--dtype float32: " in capsys.readouterr().err
    assert main(["run", "--resume", "bf", *base]) == 0  # without --dtype: the run's own


# -- pruning: bfloat16 and block offload -----------------------------------------------------------------------------
def test_prune_in_bfloat16_on_the_cpu_records_it_and_saves_float32(tiny_dir, tmp_path):
    out = tmp_path / "bf"
    assert main(["prune", "--method", "wanda", "--sparsity", "0.5", "--model", str(tiny_dir), "--model-out",
                 str(out), "--dtype", "bfloat16", "--calibration-samples", "4"]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    assert (record["device"], record["dtype"], record["offloaded"]) == ("cpu", "bfloat16", False)
    assert record["device_peak_mem_bytes"] is None and 0.45 < record["lm_global"] < 0.55
    assert {p.dtype for p in DrivingLLM.from_pretrained(out).parameters()} == {torch.float32}
    # Another precision is another recipe (the bench's cache never mixes them); the default's key is unchanged.
    assert recipe("wanda", 0.5, dtype="bfloat16") != recipe("wanda", 0.5) == recipe("wanda", 0.5, dtype="float32")


def test_eval_open_answers_in_bfloat16_on_the_cpu(tiny_dir):
    from prunedrive.app.eval_open import cmd_eval_open

    results = cmd_eval_open(tiny_dir, tiny_dir / "data", max_samples=3, dtype="bfloat16")
    assert set(results) == {"trained", "random"} and results["trained"]


def test_training_methods_refuse_another_dtype(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--dtype bfloat16: dg2pf trains, and training runs in float32 only"):
        prune_model_dir(tiny_dir, "dg2pf", 0.5, tmp_path / "d", dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="--finetune trains"):
        prune_model_dir(tiny_dir, "wanda", 0.5, tmp_path / "d", dtype="bfloat16", finetune=True, progress=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "owl"])
def test_block_offload_prunes_exactly_as_in_memory(tiny_dir, tmp_path, monkeypatch, method):
    """The offload path (model on the CPU, one block at a time on the device with the cached inputs), forced with
    the device "cpu", gives bit-identical weights to in-memory pruning; and it really ran block by block."""
    visits = []
    original = calibration.on_offload_device

    def counting(block):
        visits.append(calibration.offload_device())
        return original(block)

    monkeypatch.setattr(calibration, "on_offload_device", counting)
    common = dict(n_calibration=6, progress=False)
    memory = prune_model_dir(tiny_dir, method, 0.5, tmp_path / "memory", offload="never", **common)
    assert memory["offloaded"] is False and all(v is None for v in visits)
    visits.clear()
    offloaded = prune_model_dir(tiny_dir, method, 0.5, tmp_path / "offload", offload="always", **common)
    assert offloaded["offloaded"] is True
    blocks = len(DrivingLLM.from_pretrained(tiny_dir).lm.model.layers)
    assert len(visits) >= blocks and set(visits) == {torch.device("cpu")}
    a = DrivingLLM.from_pretrained(tmp_path / "memory").state_dict()
    b = DrivingLLM.from_pretrained(tmp_path / "offload").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dense = DrivingLLM.from_pretrained(tiny_dir).state_dict()
    assert any(not torch.equal(a[k], dense[k]) for k in a)  # it pruned something


def test_a_bad_offload_mode_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--offload 'sometimes': allowed: auto, always, never"):
        prune_model_dir(tiny_dir, "wanda", 0.5, tmp_path / "x", offload="sometimes")


# -- CUDA (skipped without a GPU) ------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
def test_cuda_clock_and_peak_memory():
    dev.reset_peak_memory("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    with dev.DeviceClock("cuda") as clock:
        for _ in range(5):
            x = x @ x / 2048
    assert clock.seconds > 0 and dev.peak_memory_bytes("cuda") >= x.numel() * 4


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_agent_decodes_on_the_gpu_and_reports_device_time(tiny_dir, dtype):
    agent = LLMAgent(str(tiny_dir), max_new_tokens=4, device="cuda", dtype=dtype)
    assert {p.device.type for p in agent.model.parameters()} == {"cuda"}
    agent.reset(Scenario(name="s", kind="highway_cruise"))
    split = synthetic_split(4, seed=4)
    agent.act(split.observation(0))
    report = agent.last_compute()
    assert report["device_time_s"] > 0 and report["device_peak_mem_bytes"] > 0
    agent.configure_batch(4)
    agent.act_batch([split.observation(i) for i in range(4)])
    rows = agent.last_compute_batch()
    assert all(r["device_time_s"] > 0 for r in rows)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
def test_cuda_text_agent_decodes_on_the_gpu(tmp_path):
    from transformers import AutoModelForCausalLM
    from test_hf_models import _configs, _tokenizer

    from prunedrive.agents.text_llm import TextLLMAgent

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_configs()["llama"]).save_pretrained(tmp_path / "llama")
    _tokenizer(chat=False).save_pretrained(tmp_path / "llama")
    agent = TextLLMAgent(tmp_path / "llama", max_new_tokens=4, device="cuda", dtype="bfloat16")
    split = synthetic_split(3, seed=5)
    agent.reset(Scenario(name="s", kind="highway_cruise"))
    agent.act_batch([split.observation(i) for i in range(3)])
    assert all(r["device_time_s"] > 0 and r["device_peak_mem_bytes"] > 0 for r in agent.last_compute_batch())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cuda_prune_in_memory_and_offloaded_agree_and_record_peak(tiny_dir, tmp_path, method):
    common = dict(n_calibration=6, progress=False, device="cuda")
    memory = prune_model_dir(tiny_dir, method, 0.5, tmp_path / "m", offload="never", **common)
    offloaded = prune_model_dir(tiny_dir, method, 0.5, tmp_path / "o", offload="always", **common)
    assert memory["device_peak_mem_bytes"] > 0 and offloaded["device_peak_mem_bytes"] > 0
    assert offloaded["offloaded"] and not memory["offloaded"]
    a = DrivingLLM.from_pretrained(tmp_path / "m").state_dict()
    b = DrivingLLM.from_pretrained(tmp_path / "o").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
def test_cuda_dg2pf_trains_on_the_gpu(tiny_dir, tmp_path):
    record = prune_model_dir(tiny_dir, "dg2pf", 0.5, tmp_path / "d", device="cuda", progress=False,
                             sparsity_epochs=1, max_epochs=1, finetune_max_epochs=1, train_batches=2, val_batches=2)
    assert record["device"] == "cuda" and record["device_peak_mem_bytes"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
def test_cuda_run_through_the_cli(tiny_dir, tiny_suite, tmp_path):
    assert main(["run", "--suite", str(tiny_suite), "--seeds", "1", "--agent", "llm", "--model", str(tiny_dir),
                 "--agent-arg", "max_new_tokens=3", "--device", "cuda", "--dtype", "bfloat16", "--out",
                 str(tmp_path), "--run-id", "gpu", "--quiet"]) == 0
    import pandas as pd

    steps = pd.read_parquet(tmp_path / "gpu" / "steps.parquet")
    assert (steps["device_time_s"] > 0).all() and (steps["device_peak_mem_bytes"] > 0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
def test_cuda_2_4_path_is_installed_only_where_measured_faster(tiny_dir, tmp_path):
    prune_model_dir(tiny_dir, "wanda", None, tmp_path / "nm", pattern="2:4", n_calibration=6, progress=False)
    agent = LLMAgent(str(tmp_path / "nm"), max_new_tokens=4, device="cuda", dtype="float16", sparse="auto")
    agent.reset(Scenario(name="s", kind="highway_cruise"))
    for name, choice in agent.path_report.items():
        if choice.path != "dense":
            assert choice.cost_us[choice.path] < choice.cost_us["dense"], name
