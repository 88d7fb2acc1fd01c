"""Model + data + training recipes. A preset's hash names its trained model in the zoo, so changing any
number here retrains the default model instead of silently reusing a stale one."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from prunedrive.models.driving_llm import DrivingLLMConfig

# Version of what a model's training data depends on beyond the recipe: features (models/driving_llm.py), texts
# (models/text.py) and the simulator set-up (harness/backends/highway.py). 3: intersection traffic no longer
# retunes every later episode's IDM traffic (IntersectionIDMVehicle).
FORMAT = 3


@dataclass(frozen=True)
class DataRecipe:
    train_episodes: int = 60
    val_episodes: int = 12       # one per training scenario
    noise: float = 0.06          # per-step chance to start a perturbation burst (DAgger-style; labels stay expert)
    max_steps: int | None = 150  # per-episode cap: long episodes are mostly the expert waiting, which teaches inertia
    scenarios: str = "train"     # suite with the training scenarios (scenarios/train.yaml)


@dataclass(frozen=True)
class TrainRecipe:
    steps: int = 1500
    batch_size: int = 48
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    min_lr_ratio: float = 0.05
    perception_fraction: float = 0.5  # share of rows that also give a perception question per epoch
    checkpoint_every: int = 250
    log_every: int = 25
    tokenizer_vocab: int = 768
    # DAgger: at dagger_at * steps the model so far drives `dagger_episodes` training episodes (the expert
    # takes over on a dagger_beta share of steps), the expert labels them, and training goes on with them.
    dagger_episodes: int = 24
    dagger_at: float = 0.6
    dagger_beta: float = 0.3


# Version of the text-format recipe beyond the numbers below: how app/train_text.py tokenizes and builds its
# training sequences (bump it when that changes). The scene text's own version is hashed too.
TEXT_FORMAT = 1
TEXT_LM_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size")  # what a text model takes from `model`


@dataclass(frozen=True)
class TextTrainRecipe:
    """`prunedrive train --format text`: a plain LlamaForCausalLM of the preset's LM sizes on the scene-text
    rendering of the same expert rows (prompt = scene text + action question, target = the action answer).
    Sequences are ~260 prompt tokens + ~9 answer tokens with `small`'s data and vocab 1024 (~550 + ~47 on `tiny`'s
    two episodes), so batches are smaller than the vector model's. `small`: 800 steps of 16 (1.6 epochs of its
    ~8k rows), ~2.8 s a step on a busy 2-core CPU (1 thread; see app/train_text.py)."""
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3
    finetune_lr: float = 1e-4   # `--init DIR`: fine-tuning an existing causal LM
    weight_decay: float = 0.01
    warmup: int = 50
    min_lr_ratio: float = 0.05
    checkpoint_every: int = 100
    log_every: int = 25
    tokenizer_vocab: int = 1024
    max_positions: int = 2048   # RoPE positions of the trained Llama (prompt + answer + decoding room)


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    text_train: TextTrainRecipe = field(default_factory=TextTrainRecipe)  # not part of hash(): see text_hash()

    def model_config(self) -> DrivingLLMConfig:
        return DrivingLLMConfig(**self.model, preset=self.name, config_hash=self.hash())

    def text_lm(self) -> dict:
        """The LM sizes a text-format model of this preset takes (the vector model's language model)."""
        return {k: self.model[k] for k in TEXT_LM_KEYS}

    def text_hash(self) -> str:
        """Names the text-format model in the zoo: LM sizes, data recipe, text recipe, the training suite's
        file, FORMAT, TEXT_FORMAT and the scene-text version."""
        from prunedrive.models.scene_text import SCENE_TEXT_VERSION
        from prunedrive.scenarios.loader import suite_path

        suite = suite_path(self.data.scenarios).read_text()
        blob = json.dumps({"name": self.name, "lm": self.text_lm(), "data": asdict(self.data),
                           "text_train": asdict(self.text_train), "suite": suite, "format": FORMAT,
                           "text_format": TEXT_FORMAT, "scene_text": SCENE_TEXT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def hash(self) -> str:
        """Covers the recipe, the training suite's file and FORMAT (bump it when features, texts or the
        simulator set-up change)."""
        from prunedrive.scenarios.loader import suite_path

        suite = suite_path(self.data.scenarios).read_text()
        blob = json.dumps({"name": self.name, "model": self.model, "data": asdict(self.data),
                           "train": asdict(self.train), "suite": suite, "format": FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


PRESETS = {
    # Unit tests: trains a few steps in seconds.
    "tiny": Preset("tiny", dict(enc_dim=32, enc_heads=2, num_latents=4, direct_tokens=2, hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64),
                   DataRecipe(train_episodes=2, val_episodes=1, max_steps=12),
                   TrainRecipe(steps=30, batch_size=8, lr=3e-3, warmup=3, checkpoint_every=10, log_every=5,
                               tokenizer_vocab=400, dagger_episodes=1, dagger_at=0.5),
                   TextTrainRecipe(steps=40, batch_size=8, lr=3e-3, finetune_lr=1e-3, warmup=4, checkpoint_every=10,
                                   log_every=5, tokenizer_vocab=512)),
    # The default: trains on a 2-core CPU in 7-11 minutes including data generation.
    "small": Preset("small", dict(enc_dim=128, enc_heads=4, num_latents=8, direct_tokens=2, hidden_size=160, num_layers=4,
                                  num_heads=4, intermediate_size=640)),
    # For users with time: ~4x the LM, 16 latents, more data.
    "base": Preset("base", dict(enc_dim=192, enc_heads=4, num_latents=16, direct_tokens=3, hidden_size=256, num_layers=6,
                                num_heads=8, intermediate_size=1024),
                   DataRecipe(train_episodes=200, val_episodes=20),
                   TrainRecipe(steps=6000, batch_size=64, lr=1e-3, warmup=200, checkpoint_every=500),
                   TextTrainRecipe(steps=4000, batch_size=16, lr=6e-4, finetune_lr=5e-5, warmup=200,
                                   checkpoint_every=500)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
