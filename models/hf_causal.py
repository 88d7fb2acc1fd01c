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

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from prunedrive.models import scene_text
from prunedrive.models.compressed_load import is_compressed_checkpoint, load_compressed_causal_lm
from prunedrive.models.weight_files import (SAFETENSORS_NAMES, NotACausalLM,  # noqa: F401 -- re-exported
                                            weight_bytes, weight_files)
from prunedrive.models.pruning.surgery import load_structured, recorded_structure

DRIVING_LLM_MODEL_TYPE = "prunedrive-driving-llm"  # what models/driving_llm.py writes into its config.json
CONFIG_NAME = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
HOW = ("a local Hugging Face causal LM directory is needed (config.json, model.safetensors, tokenizer files, "
       "e.g. written by save_pretrained); nothing is downloaded")


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


def check_weights(path: Path) -> Path:
    if not any(os.path.lexists(path / n) for n in SAFETENSORS_NAMES):
        pickles = [n for n in PICKLE_NAMES if (path / n).is_file()]
        if pickles:
            raise NotACausalLM(f"{path / pickles[0]}: only safetensors weights are loaded (a pickle can run code); "
                               f"convert it to {path / SAFETENSORS_NAMES[0]} first")
        raise NotACausalLM(f"{path / SAFETENSORS_NAMES[0]} is missing (no weights in {str(path)!r}); {HOW}")
    from safetensors import safe_open

    files = weight_files(path)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise NotACausalLM(f"{file} is not a readable safetensors file ({exc})") from None
    return next(path / n for n in SAFETENSORS_NAMES if os.path.lexists(path / n))


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
    check_weights(path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per agent would clutter a run's output
    try:
        if is_compressed_checkpoint(path):  # transformers' own loader needs the sparse compressors compressed-tensors dropped
            model = _load_compressed(path, config, dtype)
        elif recorded_structure(config) is not None:  # structurally pruned, per-block widths: no stock config has them
            model = load_structured(path, dtype=_dtype(dtype))
        else:
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


def _load_compressed(path: Path, config, dtype):
    """A compressed-tensors checkpoint decompressed on the CPU (models.compressed_load); the model carries the
    record of what was read (`model.compression`: scheme, execution, bytes on disk and in memory)."""
    resolved = _dtype(dtype)
    if resolved == "auto":  # the checkpoint's own float dtype, as from_pretrained reads it
        resolved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        resolved = _dtype(resolved) if not isinstance(resolved, torch.dtype) else resolved
    model, loaded = load_compressed_causal_lm(path, dtype=resolved)
    model.compression = loaded.record()
    return model


# -- can it drive? (checked once, when an agent is built) -------------------------------------------
MAX_PROMPT_CHARS = 64 * 1024          # a rendered prompt longer than this is a broken template, not a scene
TEMPLATE_SECONDS = 5.0                # rendering one prompt may take this long (measured after the imports)
TEMPLATE_MEMORY_BYTES = 256 << 20     # ... and allocate this much beyond what the renderer process holds
_RENDER_START_S = 120.0               # the renderer's start (python + transformers' template module) on a busy box
# Run as `python -P -c`: transformers renders the template in its own jinja2 sandbox, under an address-space
# limit and an alarm, in a process of its own, so `{{ 'x' * 2000000000 }}` is a MemoryError there, not 4 GB here.
_RENDER_CHILD = r"""
import json, resource, signal, sys
request = json.load(sys.stdin)
from transformers.utils.chat_template_utils import render_jinja_template

late = []

def too_slow(*_):
    late.append(True)  # jinja2 may turn the exception into another one while it rewrites the traceback
    raise TimeoutError

try:  # Linux: the address space held now, plus the allowance
    with open("/proc/self/statm") as statm:
        held = int(statm.read().split()[0]) * resource.getpagesize()
except OSError:  # elsewhere only the time limit applies
    held = None
if held is not None:
    limit = held + request["memory_bytes"]
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
signal.signal(signal.SIGALRM, too_slow)
signal.setitimer(signal.ITIMER_REAL, request["seconds"])
try:
    rendered, _ = render_jinja_template(conversations=[request["messages"]], chat_template=request["template"],
                                        add_generation_prompt=True, **request["kwargs"])
    answer = {"chars": len(rendered[0]), "blank": not rendered[0].strip()}
except MemoryError:
    answer = {"error": f"rendering needs more than {request['memory_bytes'] >> 20} MiB"}
except BaseException as exc:
    answer = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if late:
        answer = {"error": f"rendering took more than {request['seconds']:g} s"}
signal.setitimer(signal.ITIMER_REAL, 0)
sys.stdout.write(json.dumps(answer))
"""


def chat_template_file(directory: Path) -> Path:
    """Where the directory's chat template is written (for messages): chat_template.jinja (transformers >= 4.5x)
    or chat_template.json when present, else tokenizer_config.json's `chat_template`."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (directory / name).is_file():
            return directory / name
    return directory / "tokenizer_config.json"


@functools.lru_cache(maxsize=16)
def _bounded_render(template: str, kwargs_json: str, messages_json: str) -> tuple[int, bool]:
    """(characters, blank) of the template rendered on the messages in a limited child process (see
    _RENDER_CHILD); a template that raises, runs out of memory or time is a ValueError with the reason.
    Cached: a model's pruned variants share one template."""
    request = {"template": template, "kwargs": json.loads(kwargs_json), "messages": json.loads(messages_json),
               "seconds": TEMPLATE_SECONDS, "memory_bytes": TEMPLATE_MEMORY_BYTES}
    try:
        child = subprocess.run([sys.executable, "-P", "-c", _RENDER_CHILD], input=json.dumps(request),
                               capture_output=True, text=True, timeout=_RENDER_START_S + TEMPLATE_SECONDS)
    except subprocess.TimeoutExpired:
        raise ValueError(f"rendering did not finish within {_RENDER_START_S + TEMPLATE_SECONDS:g} s") from None
    try:
        answer = json.loads(child.stdout)
    except ValueError:
        last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise ValueError(f"the renderer process failed ({last})") from None
    if "error" in answer:
        raise ValueError(answer["error"])
    return int(answer["chars"]), bool(answer["blank"])


def _check_chat_template(path: Path, tokenizer, messages: list[dict[str, str]]) -> None:
    """The tokenizer's chat template renders the probe messages: no error, not blank, at most MAX_PROMPT_CHARS
    characters, within TEMPLATE_SECONDS and TEMPLATE_MEMORY_BYTES."""
    source = chat_template_file(path)
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, TypeError) as exc:
        raise NotACausalLM(f"{source}: no usable chat template ({exc})") from None
    kwargs = json.dumps(dict(getattr(tokenizer, "special_tokens_map", {}) or {}), default=str)
    try:
        chars, blank = _bounded_render(template, kwargs, json.dumps(messages))
    except ValueError as exc:
        raise NotACausalLM(f"{source}: the chat template cannot render a scene prompt: {exc}") from None
    if blank:
        raise NotACausalLM(f"{source}: the chat template renders a scene prompt as empty text")
    if chars > MAX_PROMPT_CHARS:
        raise NotACausalLM(f"{source}: the chat template renders a scene prompt as {chars} characters, more than "
                           f"{MAX_PROMPT_CHARS} (the scene itself is about 2000)")


def max_positions(config) -> tuple[int | None, str]:
    """(the model's positions, the config field that says so), or (None, "") when the config sets none."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None, ""


def check_drivable(directory: str | Path, tokenizer, config, max_new_tokens: int,
                   chat_template: bool | None = None) -> int:
    """Whether the model can answer a scene at all, checked once before it drives: the prompt of the busiest
    scene (scene_text.probe_observation) renders (a chat template: see _check_chat_template), tokenizes to at
    least one token, and with max_new_tokens fits the model's positions. Returns the probe prompt's token count;
    an error names the file at fault (chat template, tokenizer or config.json)."""
    path, _ = check_directory(directory)
    probe = scene_text.probe_observation()
    chat = chat_template is not False and uses_chat_template(tokenizer)
    if chat:
        _check_chat_template(path, tokenizer, scene_text.action_messages(probe))
    source = chat_template_file(path) if chat else path / "tokenizer_config.json"
    try:
        ids = prompt_ids(tokenizer, probe, chat_template)
    except Exception as exc:  # noqa: BLE001 -- a template or tokenizer can raise anything
        raise NotACausalLM(f"{source}: the scene prompt cannot be built ({type(exc).__name__}: {exc})") from None
    if not ids:
        raise NotACausalLM(f"{source}: the scene prompt tokenizes to no tokens")
    positions, field = max_positions(config)
    if positions is not None and len(ids) + max_new_tokens > positions:
        raise NotACausalLM(f"{path / CONFIG_NAME}: the longest scene prompt has {len(ids)} tokens, plus "
                           f"max_new_tokens={max_new_tokens} = {len(ids) + max_new_tokens}, more than the model's "
                           f"{positions} positions ({field}); lower max_new_tokens (--agent-arg max_new_tokens=N) "
                           "or use a model with a longer context")
    return len(ids)


def check_causal_lm_dir(directory: str | Path, max_new_tokens: int, trust_remote_code: bool = False,
                        chat_template: bool | None = None) -> None:
    """Everything load_causal_lm and check_drivable check, without loading the weights (their headers are
    read): for checking a run's model directories before anything drives."""
    config = load_config(directory, trust_remote_code)
    path, _ = check_directory(directory)
    check_weights(path)
    check_drivable(path, load_tokenizer(path, trust_remote_code), config, max_new_tokens, chat_template)


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
