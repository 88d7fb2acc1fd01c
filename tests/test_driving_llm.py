import json

import pytest
import torch

from prunedrive.models import text
from prunedrive.models.data import synthetic_split
from prunedrive.models.driving_llm import DrivingLLM, DrivingLLMConfig, collate
from prunedrive.models.presets import PRESETS
from prunedrive.app.train import Batches, untrained_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split():
    return synthetic_split()


@pytest.fixture(scope="module")
def tiny(split):
    return untrained_model(PRESETS["tiny"], split)


def test_interfaces_for_pruning(tiny, split):
    assert len(tiny.lm.model.layers) == PRESETS["tiny"].model["num_layers"]
    ids = torch.tensor([tiny.prompt_ids(text.prompt("action"))] * 2)
    inputs = tiny.lm_inputs(collate([split.observation(0), split.observation(1)]), ids, torch.ones_like(ids))
    assert inputs["inputs_embeds"].shape == (2, tiny.prefix_tokens + ids.shape[1], tiny.config.hidden_size)
    assert inputs["attention_mask"].shape == inputs["inputs_embeds"].shape[:2]
    assert tiny.lm(**inputs).logits.shape[-1] == len(tiny.tokenizer)
    batch = Batches(split, tiny.tokenizer, 1.0, 0).collate([(0, "action"), (1, "objects")])
    logits, labels = tiny(batch)
    assert logits.shape[:2] == labels.shape
    assert (labels[:, : tiny.prefix_tokens] == -100).all()
    n_prompt = len(tiny.prompt_ids(text.prompt("action")))
    assert (labels[0, : tiny.prefix_tokens + n_prompt] == -100).all()
    answer = labels[0][labels[0] != -100].tolist()
    assert tiny.tokenizer.decode(answer) == split.frame["a_action"][0]  # eos is the last label


def test_greedy_loop_matches_hf_generate(tiny, split):
    batch = collate([split.observation(3)])
    ids, stats = tiny.generate(batch, text.prompt("lead"), max_new_tokens=8)
    prompt = torch.tensor([tiny.prompt_ids(text.prompt("lead"))])
    with torch.no_grad():
        hf = tiny.lm.generate(**tiny.lm_inputs(batch, prompt), max_new_tokens=8, do_sample=False,
                              pad_token_id=tiny.tokenizer.pad_id, eos_token_id=tiny.tokenizer.eos_id)
    hf = [t for t in hf[0].tolist() if t != tiny.tokenizer.eos_id][: len(ids[0])]
    assert ids[0] == hf
    assert stats["tokens_in"] == tiny.prefix_tokens + prompt.shape[1]


def test_save_load_round_trip(tiny, split, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_latents"] == 4 and config["lm"]["hidden_size"] == 32 and config["preset"] == "tiny"
    assert config["config_hash"] == PRESETS["tiny"].hash()
    loaded = DrivingLLM.from_pretrained(tmp_path / "m")
    batch = Batches(split, tiny.tokenizer, 1.0, 0).collate([(i, "action") for i in range(4)])
    with torch.no_grad():
        assert torch.equal(tiny(batch)[0], loaded(batch)[0])
    obs = [split.observation(i) for i in range(3)]
    assert tiny.answer(obs, text.prompt("action"), 12) == loaded.answer(obs, text.prompt("action"), 12)


@pytest.mark.parametrize("name", ["meta-llama/Llama-2-7b", "wayveai/driving-llm"])
def test_hub_names_are_refused(name):
    with pytest.raises(ValueError, match="trained locally with `prunedrive train`"):
        DrivingLLM.from_pretrained(name)


def test_missing_or_foreign_directories_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="prunedrive train"):
        DrivingLLM.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="lacks"):
        DrivingLLM.from_pretrained(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        DrivingLLM.from_pretrained(tmp_path / "f")


def test_tiny_model_loss_falls(tiny, split):
    torch.manual_seed(0)
    model = DrivingLLM(DrivingLLMConfig(**{**tiny.config.__dict__, "lm": {}}), tiny.tokenizer)
    batch = Batches(split, tiny.tokenizer, 1.0, 0).collate([(i, "action") for i in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model.loss(*model(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_train_pipeline_and_resume(tmp_path):
    """The whole recipe on the tiny preset: simulator data, tokenizer, training, checkpoint, final model."""
    from prunedrive.app.train import train

    out = train("tiny", out_dir=tmp_path / "tiny", progress=False, threads=1)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == PRESETS["tiny"].train.steps and log[-1]["loss"] < log[0]["loss"]
    latest = "checkpoint/" + (out / "checkpoint" / "latest").read_text().strip()
    for name in ("config.json", "model.safetensors", "tokenizer.json", f"{latest}/optimizer.pt",
                 "data/train.parquet", "data/val.json", "checkpoint/dagger/dagger.parquet"):
        assert (out / name).is_file(), name
    assert len(list((out / "checkpoint").glob("step-*"))) == 1 and not list((out / "checkpoint").glob(".*tmp"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["dagger_rows"] > 0
    model = DrivingLLM.from_pretrained(out)
    again = DrivingLLM.from_pretrained(train("tiny", out_dir=out, progress=False, threads=1))  # resumes: nothing left
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    fresh = DrivingLLM.from_pretrained(train("tiny", out_dir=tmp_path / "fresh", progress=False, threads=1))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())), \
        "same seed and thread count, from scratch (data included), must give the same weights"
    torn = out / latest / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable training checkpoint.*--no-resume"):
        train("tiny", out_dir=out, progress=False, threads=1)


def test_train_refuses_a_bad_thread_count(tmp_path):
    from prunedrive.app.train import train

    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        train("tiny", out_dir=tmp_path, progress=False, threads=0)


def test_calibration_samples_feed_the_lm(tiny, split):
    from prunedrive.models.data import lm_calibration_samples

    samples = lm_calibration_samples(tiny, split, n_samples=5)
    assert len(samples) == 5 and all(s["inputs_embeds"].shape[0] == 1 for s in samples)
    assert all(s["attention_mask"].shape == s["inputs_embeds"].shape[:2] for s in samples)
    with torch.no_grad():
        assert tiny.lm(**samples[0]).logits.shape[1] == samples[0]["inputs_embeds"].shape[1]
