"""Any Hugging Face causal LM from a local directory, and the scene-text prompts it is driven with.

    model, tokenizer = load_causal_lm("~/models/Qwen2.5-0.5B-Instruct")

Local only: the directory must exist (a hub name such as "org/model" is refused with a message; nothing is
downloaded, `local_files_only=True` everywhere), hold config.json with a model_type transformers knows as a
causal LM, safetensors weights (model.safetensors or a sharded model.safetensors.index.json; pickled
pytorch_model.bin is refused: loading a pickle runs code) and a tokenizer. Custom modelling code
(`auto_map` in config.json) runs only when the caller passes trust_remote_code=True.

Prompts: `prompt_ids(tokenizer, observation)` renders the observation with models.scene_text and, when the
tokenizer has a chat template, wraps it as one user turn with the generation prompt; otherwise the plain
prompt ending in "Answer:" is tokenized with the tokenizer's own special tokens (e.g. BOS).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from prunedrive.models import scene_text

DRIVING_LLM_MODEL_TYPE = "prunedrive-driving-llm"  # what models/driving_llm.py writes into its config.json
CONFIG_NAME = "config.json"
SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
HOW = ("a local Hugging Face causal LM directory is needed (config.json, model.safetensors, tokenizer files, "
       "e.g. written by save_pretrained); nothing is downloaded")


class NotACausalLM(ValueError):
    """The directory is not a loadable local causal LM; the message names the file at fault."""


def _dtype(dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16 or auto")
    return value


def check_directory(directory: str | Path) -> tuple[Path, dict]:
    """The resolved directory and its parsed config.json, or an error naming what is missing or wrong."""
    path = Path(directory).expanduser()
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(directory)) and not str(directory).startswith((".", "/", "~")):
            raise NotACausalLM(f"{str(directory)!r} looks like a model hub name, not a local directory; {HOW}. "
                               "Download it yourself (e.g. `huggingface-cli download NAME --local-dir DIR`) and "
                               "pass DIR.")
        raise FileNotFoundError(f"no model directory at {str(path)!r}; {HOW}")
    if not path.is_dir():
        raise NotACausalLM(f"{str(path)!r} is not a directory; {HOW}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise NotACausalLM(f"{config_file} is missing: {str(path)!r} is not a model directory; {HOW}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotACausalLM(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise NotACausalLM(f"{config_file} has no model_type: not a transformers model config")
    if config["model_type"] == DRIVING_LLM_MODEL_TYPE:
        raise NotACausalLM(f"{config_file} is a prunedrive DrivingLLM (vector encoder + LM), not a plain causal LM: "
                           "drive it with --agent llm")
    return path, config


def is_hf_causal_lm_dir(directory: str | Path) -> bool:
    """True for a directory with a transformers config.json that is not prunedrive's own driving LLM."""
    try:
        check_directory(directory)
    except (NotACausalLM, FileNotFoundError):
        return False
    return True


def _check_weights(path: Path) -> Path:
    found = [path / n for n in SAFETENSORS_NAMES if (path / n).is_file()]
    if not found:
        pickles = [n for n in PICKLE_NAMES if (path / n).is_file()]
        if pickles:
            raise NotACausalLM(f"{path / pickles[0]}: only safetensors weights are loaded (a pickle can run code); "
                               f"convert it to {path / SAFETENSORS_NAMES[0]} first")
        raise NotACausalLM(f"{path / SAFETENSORS_NAMES[0]} is missing (no weights in {str(path)!r}); {HOW}")
    from safetensors import safe_open

    if found[0].name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(found[0].read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NotACausalLM(f"{found[0]} is not a safetensors index ({exc!r})") from None
        files = [path / s for s in shards]
    else:
        files = found[:1]
    for file in files:
        if not file.is_file():
            raise NotACausalLM(f"{file} is missing (listed in {found[0].name})")
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise NotACausalLM(f"{file} is not a readable safetensors file ({exc})") from None
    return found[0]


def load_config(directory: str | Path, trust_remote_code: bool = False):
    """The transformers config of a local causal LM directory (checked: known model_type, causal LM)."""
    from transformers import AutoConfig
    from transformers import __version__ as transformers_version
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path, raw = check_directory(directory)
    config_file = path / CONFIG_NAME
    custom = "AutoModelForCausalLM" in (raw.get("auto_map") or {})
    if raw["model_type"] not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (custom and trust_remote_code):
        if custom:
            raise NotACausalLM(f"{config_file}: model_type {raw['model_type']!r} needs the directory's own modelling "
                               "code (auto_map); pass trust_remote_code=True (--agent-arg trust_remote_code=true) "
                               "if you trust it")
        raise NotACausalLM(f"{config_file}: model_type {raw['model_type']!r} is not a causal LM known to "
                           f"transformers {transformers_version}")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise NotACausalLM(f"{config_file} cannot be read as a transformers config: {exc}") from None


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, _ = check_directory(directory)
    if not any((path / n).is_file() for n in TOKENIZER_NAMES):
        raise NotACausalLM(f"{str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_NAMES)}); save one with "
                           "tokenizer.save_pretrained(DIR)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise NotACausalLM(f"the tokenizer in {str(path)!r} cannot be loaded: {exc}") from None
    if isinstance(tokenizer, bool) or not callable(getattr(tokenizer, "encode", None)):
        raise NotACausalLM(f"the tokenizer in {str(path)!r} cannot be loaded")
    return tokenizer


def load_causal_lm(directory: str | Path, trust_remote_code: bool = False, dtype="float32"):
    """(model in eval mode, tokenizer) from a local directory; see the module docstring for what is checked."""
    from transformers import AutoModelForCausalLM

    config = load_config(directory, trust_remote_code)
    path, _ = check_directory(directory)
    _check_weights(path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per agent would clutter a run's output
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, local_files_only=True,
                                                     use_safetensors=True, trust_remote_code=trust_remote_code,
                                                     dtype=_dtype(dtype))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise NotACausalLM(f"{path / SAFETENSORS_NAMES[0]} does not load into {type(config).__name__}: {exc}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer


# -- prompts ---------------------------------------------------------------------------------------
def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, observation, chat_template: bool | None = None) -> str:
    """The prompt as text: the chat template applied to `scene_text.action_messages` when the tokenizer has one
    (and chat_template is not False), else `scene_text.action_prompt`."""
    if chat_template is not False and uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(scene_text.action_messages(observation), add_generation_prompt=True,
                                             tokenize=False)
    return scene_text.action_prompt(observation)


def prompt_ids(tokenizer, observation, chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt; a chat template writes its own special tokens, a plain prompt gets the
    tokenizer's (e.g. BOS)."""
    chat = chat_template is not False and uses_chat_template(tokenizer)
    return list(tokenizer(prompt_text(tokenizer, observation, chat_template), add_special_tokens=not chat)["input_ids"])


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer that follows the prompt (teacher forcing, calibration)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])
