"""A first run that respects a newcomer's hour: the trained default model ships with the package (and is used
only while its recipe hash is current), and every long phase prints progress a log can show."""
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from prunedrive.app import zoo
from prunedrive.harness import progress
from prunedrive.models.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_shipped_small_model_has_the_current_recipe_hash():
    shipped = zoo.shipped_hash("small")
    command = zoo.SHIP_COMMAND.format(preset="small")
    assert shipped is not None, f"no shipped small model in {zoo.shipped_model_dir('small')}; ship one: {command}"
    assert shipped == get_preset("small").hash(), (
        f"the shipped small model was trained with recipe {shipped}, the recipe is now {get_preset('small').hash()}:"
        f" it is stale and first runs train for minutes. Re-ship it: {command}")
    assert zoo.shipped_is_current("small")


def test_the_shipped_model_is_small_and_loads():
    from prunedrive.models.data import load_split
    from prunedrive.models.driving_llm import DrivingLLM

    directory = zoo.shipped_model_dir("small")
    sizes = zoo.sizes(directory)
    assert set(sizes) == set(zoo.SHIPPED_FILES)
    assert sum(sizes.values()) < 15e6, sizes
    model = DrivingLLM.from_pretrained(directory)
    assert model.config.config_hash == get_preset("small").hash()
    assert len(load_split(directory / "data", "train")) > 1000 and len(load_split(directory / "data", "val")) >= 200


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    from prunedrive.app.train import train

    out = tmp_path_factory.mktemp("tiny") / "model"
    return train("tiny", out_dir=out, progress=False, threads=1)


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    """The package's shipped-model folder, redirected to a temporary one (so a test can ship and break it)."""
    monkeypatch.setattr(zoo, "shipped_model_dir", lambda preset="small": tmp_path / "package" / preset)
    monkeypatch.setenv("PRUNEDRIVE_HOME", str(tmp_path / "home"))
    return tmp_path / "package"


def test_first_use_copies_the_shipped_model_instead_of_training(tiny_trained, package_dir, capsys, monkeypatch):
    from prunedrive.app import train as train_module
    from prunedrive.app.prune_driving import training_data_dir

    zoo.ship(tiny_trained, "tiny")
    assert json.loads((package_dir / "tiny" / "train_summary.json").read_text())["data_dir"] == "data"
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained although a model is shipped"))
    directory = train_module.ensure_default_model("tiny", progress=False)
    assert directory == zoo.default_model_dir("tiny") and zoo.is_trained(directory, "tiny")
    out = capsys.readouterr().out
    assert f"using the shipped tiny-{get_preset('tiny').hash()} model (trained by `prunedrive train --preset tiny`" \
           in out
    shipped, installed = load_file(tiny_trained / "model.safetensors"), load_file(directory / "model.safetensors")
    assert all(torch.equal(shipped[k], installed[k]) for k in shipped)
    assert training_data_dir(directory) == (directory / "data").resolve()  # the copy, not the developer's path
    assert (training_data_dir(directory) / "train.parquet").is_file()


def test_a_stale_shipped_model_is_not_used(tiny_trained, package_dir, capsys, monkeypatch):
    import functools

    from prunedrive.app import train as train_module

    # 1 thread: 2 threads on a busy 2-core machine make even `tiny` take a minute (the bit-identity at 2 threads
    # has its own test below)
    monkeypatch.setattr(train_module, "train", functools.partial(train_module.train, threads=1))
    zoo.ship(tiny_trained, "tiny")
    config = package_dir / "tiny" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "config_hash": "0ld0ld0ld0"}))
    assert not zoo.shipped_is_current("tiny") and not zoo.install_shipped("tiny")
    directory = train_module.ensure_default_model("tiny", progress=False)
    assert "using the shipped" not in capsys.readouterr().out
    summary = json.loads((directory / "train_summary.json").read_text())
    assert not summary.get("shipped") and summary["config_hash"] == get_preset("tiny").hash()  # trained here


def test_an_interrupted_copy_is_not_taken_for_a_model(tiny_trained, package_dir, monkeypatch):
    zoo.ship(tiny_trained, "tiny")
    real_copy = zoo._copy_atomically

    def copy_until_config(source, target):
        if target.name == "config.json":
            raise KeyboardInterrupt
        real_copy(source, target)

    monkeypatch.setattr(zoo, "_copy_atomically", copy_until_config)
    with pytest.raises(KeyboardInterrupt):
        zoo.install_shipped("tiny")
    assert not zoo.is_trained(zoo.default_model_dir("tiny"), "tiny")
    monkeypatch.setattr(zoo, "_copy_atomically", real_copy)
    assert zoo.install_shipped("tiny") and zoo.is_trained(zoo.default_model_dir("tiny"), "tiny")


def test_ship_refuses_a_model_of_another_recipe(tiny_trained, package_dir, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(tiny_trained, stale)
    config = stale / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "config_hash": "0ld0ld0ld0"}))
    with pytest.raises(ValueError, match="not a finished tiny model of the current recipe.*prunedrive train"):
        zoo.ship(stale, "tiny")


def test_tiny_trains_bit_identically_twice_with_the_cli_default_threads(tmp_path, tiny_trained):
    """`prunedrive train` uses 2 threads: the shipped model is what it reproduces (the 1-thread case:
    test_driving_llm's test_train_pipeline_and_resume). Data is shared: the rollouts are not what is tested."""
    from prunedrive.app.train import train

    data = tiny_trained / "data"
    a = load_file(train("tiny", out_dir=tmp_path / "a", data_dir=data, progress=False) / "model.safetensors")
    b = load_file(train("tiny", out_dir=tmp_path / "b", data_dir=data, progress=False) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- progress in a log -------------------------------------------------------------------------------------------

def test_ticker_lines_are_throttled_and_say_elapsed_and_eta(capsys):
    ticker = progress.Ticker("work", 20, "items", every_s=3600)
    assert ticker.enabled  # capsys: not a terminal
    ticker.update(1)
    assert capsys.readouterr().out == ""  # within every_s: quiet
    ticker.update(2, "note", force=True)
    assert ticker.line(5, elapsed=10.0) == "  work: 5/20 items, elapsed 10 s, ETA 30 s"  # 15 left at 0.5/s
    ticker.update(20)  # the end always prints
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith(", note") and "ETA 0 s" in lines[1]
    resumed = progress.Ticker("work", 20, done=10, eta_bound=True)
    assert resumed.line(15, elapsed=10.0).endswith("ETA at most 10 s")  # the rate counts only this run's 5


def test_estimate_says_idle_and_the_current_load(monkeypatch):
    monkeypatch.setattr(progress, "machine_load", lambda: (1.0, 2))
    assert progress.estimate(120) == "about 2.0 min on an idle machine"
    monkeypatch.setattr(progress, "machine_load", lambda: (6.0, 2))
    assert progress.estimate(120) == ("about 2.0 min on an idle machine; load is 6.0 on 2 cores now, "
                                      "so expect ~6.0 min")


def test_heartbeat_prints_when_nothing_else_did(capsys):
    with progress.Heartbeat(every_s=0.2, prefix=lambda: "[t] ") as beat:
        beat.set_phase("pruning 3/12")
        time.sleep(0.6)
    out = capsys.readouterr().out
    assert "[t] still pruning 3/12 (" in out
    with progress.Heartbeat(every_s=0.4):
        for _ in range(8):  # progress lines keep coming: no heartbeat
            progress.say("tick")
            time.sleep(0.1)
    assert "still" not in capsys.readouterr().out


def test_training_prints_every_phase_in_a_log(tmp_path, capsys):
    from prunedrive.app.train import train

    train("tiny", out_dir=tmp_path / "m", progress=True, threads=1)
    out = capsys.readouterr().out
    for expected in ("expert data (train): the expert drives 2 episodes", "expert data (val)", "on an idle machine",
                     "training: 30 steps, ", "s each so far -> about", "DAgger: the model so far drives 1",
                     "model rollouts (dagger): 1/1 episodes", "train tiny: 30/30 steps, elapsed", "ETA 0 s, loss"):
        assert expected in out, (expected, out)


def test_dg2pf_prints_its_epochs_in_a_log(tiny_trained, tmp_path, capsys):
    from prunedrive.app.prune import prune_model_dir

    prune_model_dir(tiny_trained, "dg2pf", 0.5, tmp_path / "p", progress=True, n_calibration=8,
                    sparsity_epochs=2, max_epochs=2, finetune_max_epochs=1, train_batches=2, val_batches=1)
    out = capsys.readouterr().out
    assert "DG2PF to sparsity 0.5: done, " in out and " epochs in " in out, out
