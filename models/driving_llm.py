"""The dense driving LLM: an object-level vector encoder feeding latent tokens to a small HF causal LM.

    observation --featurize--> per-type MLPs (ego, route, vehicles, pedestrians, traffic light)
      --> 1 self-attention block over the object tokens (relations: who is in my lane)
      --> Perceiver cross-attention: `num_latents` learned queries (+ ego) attend over the valid objects
      --> Linear into the LM embedding width = latent tokens
    LM input: inputs_embeds = [latent tokens] + [prompt token embeddings]; the answer is generated
    greedily with the KV cache.

For pruning: `model.lm` is the HF causal LM (decoder blocks at `model.lm.model.layers`), `model.encoder`
the vector encoder (plain nn.Linear layers throughout, attention included), and `model.lm_inputs(...)`
builds the LM's forward kwargs from observations and prompt ids.

Feature normalisation (fixed scales, so a saved model needs no dataset statistics):
  positions / 50 m (route: x / 25 m, y / 10 m), velocities / 20 m/s (pedestrians / 5 m/s),
  lengths / 5 m, widths / 2 m, yaw as (cos, sin), ego speed and speed limit / 20 m/s, heading error /
  0.5 rad, lane offset / 2 m, remaining route min(., 200 m) / 100 m; per route point the steer that an
  arc through it needs (atan(wheelbase * 2y / (x^2 + y^2)) / 45 deg, the pure-pursuit geometry);
  route-relative coordinates of every object (arc length along the route / 50 m, signed offset from it
  / 5 m clipped to +-4, velocity along / across the route), an in-corridor flag, and two times / 4 s
  clipped to [0, 2]: the ego's to the object's foot on the route and the object's to the route (if it
  approaches it); the closest approach between object and ego over the next 4 s (object at constant
  velocity, ego along the route at max(speed, 4 m/s)) / 10 m clipped to 3, and its time / 4 s;
  traffic light one-hot state and distance / 50 m.
The ego's last applied control and acceleration are deliberately NOT inputs: the expert does not use
them, and feeding them invites the "copycat" shortcut of behaviour cloning (repeat the last action),
which drifts in closed loop.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from prunedrive.harness.action import MAX_STEER_RAD
from prunedrive.harness.observation import (EGO_FEATURES, MAX_PEDESTRIANS, MAX_VEHICLES, OBS_SHAPES, ROUTE_POINTS,
                                 TRAFFIC_LIGHT_STATES, VEHICLE_LENGTH_M)
from prunedrive.harness.results import default_mode
from prunedrive.models.pruning.surgery import apply_structure
from prunedrive.models.text import CORRIDOR_HALF_WIDTH_M
from prunedrive.models.tokenizer import DrivingTokenizer

_E = {name: i for i, name in enumerate(EGO_FEATURES)}
EGO_IN, ROUTE_IN, VEHICLE_IN, PEDESTRIAN_IN, LIGHT_IN = 6, 4 * ROUTE_POINTS, 18, 14, len(TRAFFIC_LIGHT_STATES) + 1
WEIGHTS_NAME, CONFIG_NAME, TOKENIZER_NAME = "model.safetensors", "config.json", "tokenizer.json"


@dataclass
class DrivingLLMConfig:
    enc_dim: int = 128
    enc_heads: int = 4
    num_latents: int = 8
    direct_tokens: int = 0           # also give the LM the ego / route / light object tokens (0-3) directly
    hidden_size: int = 160
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 640
    vocab_size: int = 768
    max_positions: int = 128
    digit_loss_weight: float = 3.0   # Wayve weighs digit, '.' and '-' tokens 3x
    preset: str = "custom"
    config_hash: str = ""            # hash of the full recipe (model + data + training), set by train()
    lm: dict = field(default_factory=dict)  # the LlamaConfig as saved (filled by DrivingLLM)

    def llama_config(self, tokenizer: DrivingTokenizer) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=self.max_positions,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
            bos_token_id=tokenizer.eos_id, rope_theta=10000.0)


# -- observations -> tensors ------------------------------------------------------------------------
def collate(observations: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack observation dicts into a float32 batch (masks as float 0/1); NaN/inf become 0."""
    out = {}
    for key, shape in OBS_SHAPES.items():
        a = np.stack([np.asarray(o[key], np.float32).reshape(shape) for o in observations])
        out[key] = torch.from_numpy(np.nan_to_num(a, nan=0.0, posinf=1e4, neginf=-1e4))
    return out


def _route_frame(points: torch.Tensor, path: torch.Tensor, seg_valid: torch.Tensor):
    """Project points (B, N, 2) on the polyline path (B, P, 2) whose segments are valid where seg_valid (B, P-1).
    Returns arc length of the foot, signed offset (+ right of the route), unit tangent at the foot (B, N, 2)."""
    a, ab = path[:, :-1], path[:, 1:] - path[:, :-1]                       # (B, S, 2)
    ab2 = (ab**2).sum(-1).clamp_min(1e-6)                                  # (B, S)
    rel = points[:, :, None, :] - a[:, None]                               # (B, N, S, 2)
    t = ((rel * ab[:, None]).sum(-1) / ab2[:, None]).clamp(0.0, 1.0)       # (B, N, S)
    diff = rel - t[..., None] * ab[:, None]
    dist = diff.norm(dim=-1).masked_fill(~seg_valid[:, None], 1e6)
    k = dist.argmin(-1)                                                    # (B, N)
    seg_len = ab2.sqrt()
    arc0 = torch.cat([torch.zeros_like(seg_len[:, :1]), seg_len.cumsum(-1)[:, :-1]], -1)
    take = lambda x: torch.gather(x, 1, k)                                 # noqa: E731  (B, S) -> (B, N)
    s = take(arc0) + torch.gather(t, 2, k[..., None])[..., 0] * take(seg_len)
    tangent = torch.gather(ab, 1, k[..., None].expand(-1, -1, 2)) / take(seg_len)[..., None]
    d_foot = torch.gather(diff, 2, k[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]
    # Ego frame is x forward, y right; tangent (tx, ty): the right normal is (-ty, tx).
    signed = d_foot[..., 0] * -tangent[..., 1] + d_foot[..., 1] * tangent[..., 0]
    return s, signed, tangent


_HORIZON = torch.linspace(0.25, 4.0, 16)  # s: the expert's conflict-prediction horizon


def _ego_track(route: torch.Tensor, route_mask: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
    """Where the ego will be at each _HORIZON time if it follows the route at max(speed, 4 m/s): (B, T, 2)."""
    b, p, _ = route.shape
    n_valid = route_mask.sum(1).long()
    idx = torch.minimum(torch.arange(p)[None], (n_valid - 1).clamp_min(0)[:, None])  # repeat the last valid point
    pts = torch.gather(route, 1, idx[..., None].expand(-1, -1, 2)) * (n_valid > 0)[:, None, None]
    path = torch.cat([torch.zeros_like(pts[:, :1]), pts], 1)
    arc = torch.cat([torch.zeros(b, 1), (path[:, 1:] - path[:, :-1]).norm(dim=-1).cumsum(1)], 1)
    s = torch.minimum(speed.clamp_min(4.0)[:, None] * _HORIZON[None], arc[:, -1:])
    i = torch.searchsorted(arc.contiguous(), s.contiguous()).clamp(1, p)
    a0, a1 = torch.gather(arc, 1, i - 1), torch.gather(arc, 1, i)
    w = ((s - a0) / (a1 - a0).clamp_min(1e-6)).clamp(0, 1)[..., None]
    take = lambda j: torch.gather(path, 1, j[..., None].expand(-1, -1, 2))  # noqa: E731
    return take(i - 1) * (1 - w) + take(i) * w


def featurize(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalised per-type feature tensors (scales in the module docstring)."""
    ego = batch["ego"]
    route, route_mask = batch["route"], batch["route_mask"] > 0
    path = torch.cat([torch.zeros_like(route[:, :1]), route * route_mask[..., None]], 1)
    seg_valid = torch.cat([route_mask[:, :1], route_mask[:, 1:] & route_mask[:, :-1]], 1)
    seg_valid[:, 0] = True  # the ego->first-point segment always exists (a degenerate one if no route)

    ego_speed = ego[:, _E["speed_mps"]].clamp_min(4.0)[:, None]  # the expert also predicts with >= 4 m/s
    track = _ego_track(route, route_mask, ego[:, _E["speed_mps"]])  # (B, T, 2)

    def rel(objects: torch.Tensor, v_scale: float) -> torch.Tensor:
        s, d, tangent = _route_frame(objects[..., :2], path, seg_valid)
        v = objects[..., 2:4]
        v_along = (v * tangent).sum(-1)
        v_across = v[..., 0] * -tangent[..., 1] + v[..., 1] * tangent[..., 0]
        in_lane = ((d.abs() < CORRIDOR_HALF_WIDTH_M) & (objects[..., 0] > 0.5)).float()
        ego_time = (s / ego_speed / 4).clamp(0, 2)
        approaching = d * v_across < 0
        their_time = torch.where(approaching, d.abs() / v_across.abs().clamp_min(1e-3) / 4, torch.full_like(d, 2.0))
        # Closest approach to the ego over the horizon, both moving on (constant velocity / along the route).
        future = objects[..., None, :2] + v[..., None, :] * _HORIZON[None, None, :, None]  # (B, N, T, 2)
        gap = (future - track[:, None]).norm(dim=-1)
        closest, when = gap.min(-1)
        return torch.stack([objects[..., :2].norm(dim=-1) / 50, s / 50, (d / 5).clamp(-4, 4),
                            v_along / v_scale, v_across / v_scale, in_lane, ego_time, their_time.clamp(0, 2),
                            (closest / 10).clamp(0, 3), _HORIZON[when] / 4], -1)

    veh = batch["vehicles"]
    vehicles = torch.cat([veh[..., :2] / 50, veh[..., 2:4] / 20, torch.cos(veh[..., 4:5]), torch.sin(veh[..., 4:5]),
                          veh[..., 5:6] / 5, veh[..., 6:7] / 2, rel(veh, 20.0)], -1)
    ped = batch["pedestrians"]
    pedestrians = torch.cat([ped[..., :2] / 50, ped[..., 2:4] / 5, rel(ped, 5.0)], -1)
    remaining = ego[:, _E["route_remaining_m"]].clamp(0, 200)
    ego_f = torch.stack([ego[:, _E["speed_mps"]] / 20, ego[:, _E["heading_error_rad"]] / 0.5,
                         (ego[:, _E["lane_offset_m"]] / 2).clamp(-5, 5), ego[:, _E["speed_limit_mps"]] / 20,
                         remaining / 100, (remaining < 10).float()], -1)
    x, y = route[..., 0], route[..., 1]
    pursuit = torch.atan(VEHICLE_LENGTH_M * 2 * y / (x * x + y * y).clamp_min(1.0)) / MAX_STEER_RAD
    route_f = torch.cat([x / 25 * route_mask, (y / 10).clamp(-5, 5) * route_mask, pursuit * route_mask,
                         route_mask.float()], -1)
    light = batch["traffic_light"]
    state = F.one_hot(light[:, 0].long().clamp(0, len(TRAFFIC_LIGHT_STATES) - 1), len(TRAFFIC_LIGHT_STATES)).float()
    light_f = torch.cat([state, light[:, 1:2] / 50], -1) * batch["traffic_light_mask"]
    return {"ego": ego_f, "route": route_f, "vehicles": vehicles, "pedestrians": pedestrians,
            "light": light_f}


# -- encoder --------------------------------------------------------------------------------------
def _mlp(n_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, d), nn.GELU(), nn.Linear(d, d))


class AttentionBlock(nn.Module):
    """Pre-norm multi-head attention (queries x over context ctx, masked) + MLP, with plain nn.Linear layers."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        b, nq, d = x.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        kv = self.norm_kv(ctx)
        q, k, v = split(self.q(self.norm_q(x))), split(self.k(kv)), split(self.v(kv))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask[:, None, None, :])
        x = x + self.o(attn.transpose(1, 2).reshape(b, nq, d))
        return x + self.mlp(self.norm_mlp(x))


class VectorEncoder(nn.Module):
    def __init__(self, d: int, heads: int, num_latents: int, out_dim: int, direct_tokens: int = 0):
        super().__init__()
        self.direct_tokens = direct_tokens  # the first object tokens (ego, route, light) also passed to the LM as-is
        self.ego, self.route = _mlp(EGO_IN, d), _mlp(ROUTE_IN, d)
        self.vehicles, self.pedestrians, self.light = _mlp(VEHICLE_IN, d), _mlp(PEDESTRIAN_IN, d), _mlp(LIGHT_IN, d)
        self.type_embed = nn.Parameter(torch.randn(5, d) * 0.02)
        self.objects = AttentionBlock(d, heads)
        self.latents = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.cross = AttentionBlock(d, heads)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, out_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Geometry in the observation's float32 (metres over hundreds of metres); the features, scaled to O(1),
        # in the weights' dtype (a bfloat16/float16 model: models.device).
        f = {k: v.to(self.proj.weight.dtype) for k, v in featurize(batch).items()}
        b = f["ego"].shape[0]
        tokens = torch.cat([self.ego(f["ego"])[:, None], self.route(f["route"])[:, None], self.light(f["light"])[:, None],
                            self.vehicles(f["vehicles"]), self.pedestrians(f["pedestrians"])], 1)
        types = torch.tensor([0, 1, 2] + [3] * MAX_VEHICLES + [4] * MAX_PEDESTRIANS, device=tokens.device)
        tokens = tokens + self.type_embed[types]
        ones = torch.ones(b, 2, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([ones, batch["traffic_light_mask"] > 0, batch["vehicles_mask"] > 0,
                          batch["pedestrians_mask"] > 0], 1)
        tokens = self.objects(tokens, tokens, mask)
        queries = self.latents[None] + tokens[:, :1]  # ego-conditioned queries
        latents = self.cross(queries, tokens, mask)
        if self.direct_tokens:
            # Ego and route (and light) tokens skip the bottleneck: steering depends on them finely.
            latents = torch.cat([latents, tokens[:, : self.direct_tokens]], 1)
        return self.proj(self.norm(latents))


# -- the model ------------------------------------------------------------------------------------
class DrivingLLM(nn.Module):
    def __init__(self, config: DrivingLLMConfig, tokenizer: DrivingTokenizer):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        llama = LlamaConfig(**config.lm) if config.lm else config.llama_config(tokenizer)
        if llama.vocab_size != len(tokenizer):
            raise ValueError(f"LM vocab {llama.vocab_size} != tokenizer vocab {len(tokenizer)}")
        config.vocab_size = llama.vocab_size
        # a structurally pruned LM records per-block widths in its config: build the stock LM, then shrink it
        self.lm = apply_structure(AutoModelForCausalLM.from_config(llama, attn_implementation="sdpa"))
        config.lm = config.lm or self.lm.config.to_dict()
        self.encoder = VectorEncoder(config.enc_dim, config.enc_heads, config.num_latents, config.hidden_size,
                                     config.direct_tokens)
        weight = torch.ones(len(tokenizer))
        weight[tokenizer.digit_token_ids()] = config.digit_loss_weight
        self.register_buffer("token_weight", weight, persistent=False)
        self._prompt_cache: dict[str, list[int]] = {}

    @property
    def prefix_tokens(self) -> int:
        """Observation tokens before the prompt: the latents plus any direct object tokens."""
        return self.config.num_latents + self.config.direct_tokens

    # -- inputs ----------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        if text not in self._prompt_cache:
            self._prompt_cache[text] = self.tokenizer.encode(text)
        return self._prompt_cache[text]

    def lm_inputs(self, observation_batch: dict[str, torch.Tensor], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """LM forward kwargs: inputs_embeds = [latents] + embed(input_ids); attention_mask likewise (latents
        always attended). Pad input_ids on the right (positions count from the first latent)."""
        latents = self.encoder(observation_batch)
        embeds = self.lm.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(latents.shape[:2], dtype=attention_mask.dtype, device=latents.device)
        return {"inputs_embeds": torch.cat([latents.to(embeds.dtype), embeds], 1),
                "attention_mask": torch.cat([ones, attention_mask], 1)}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: observation keys + input_ids (prompt + answer + eos, right-padded), attention_mask and
        labels (-100 outside the answer tokens). Returns logits (B, L+T, V) and labels aligned with them
        (-100 on the latents), unshifted: position i's logits predict labels[i + 1]."""
        inputs = self.lm_inputs(batch, batch["input_ids"], batch["attention_mask"])
        logits = self.lm(**inputs, use_cache=False).logits
        pad = torch.full((logits.shape[0], self.prefix_tokens), -100, dtype=torch.long, device=logits.device)
        return logits, torch.cat([pad, batch["labels"]], 1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Answer-token cross-entropy, digit tokens weighted `digit_loss_weight` (weighted mean)."""
        logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        keep = labels != -100
        ce = F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
        w = self.token_weight[labels[keep]]
        return (ce * w).sum() / w.sum()

    # -- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, observation_batch: dict[str, torch.Tensor], prompt: str, max_new_tokens: int = 40,
                 stop_text: str | None = None) -> tuple[list[list[int]], dict]:
        """Greedy decoding with the KV cache, one prompt for the whole batch (so nothing is padded).
        Stops a sequence at eos, or once its decoded text contains `stop_text`. Returns the generated ids
        per sequence (eos excluded) and counts: tokens_in (latents + prompt), decode_steps (tokens fed back)."""
        b = observation_batch["ego"].shape[0]
        ids = torch.tensor([self.prompt_ids(prompt)] * b, dtype=torch.long, device=self.token_weight.device)
        inputs = self.lm_inputs(observation_batch, ids)
        mask = inputs["attention_mask"]
        out = self.lm(**inputs, use_cache=True, logits_to_keep=1)
        cache, embed = out.cache, self.lm.get_input_embeddings()
        generated = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        steps = 0
        for t in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            for i in range(b):
                if done[i]:
                    continue
                tok = int(token[i])
                if tok == self.tokenizer.eos_id:
                    done[i] = True
                    continue
                generated[i].append(tok)
                if stop_text and stop_text in self.tokenizer.decode(generated[i][-4:]):
                    done[i] = True
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], 1)
            out = self.lm(inputs_embeds=embed(token[:, None]), attention_mask=mask, cache=cache,
                          use_cache=True)
            cache = out.cache
            steps += 1
        return generated, {"tokens_in": int(inputs["inputs_embeds"].shape[1]), "decode_steps": steps}

    def answer(self, observations: list[dict[str, np.ndarray]], prompt: str, max_new_tokens: int = 40,
               stop_text: str | None = None) -> list[str]:
        batch = {k: v.to(self.token_weight.device) for k, v in collate(observations).items()}  # the model's device
        ids, _ = self.generate(batch, prompt, max_new_tokens, stop_text)
        return [self.tokenizer.decode(x) for x in ids]

    # -- sizes -----------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        """Unique parameters (tied embeddings counted once) of the encoder, the LM and the total."""
        count = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
        return {"encoder": count(self.encoder), "lm": count(self.lm), "total": count(self)}

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_NAME))
        (directory / WEIGHTS_NAME).chmod(default_mode())  # safetensors writes 0600; a model is shared like any file
        self.tokenizer.save(directory / TOKENIZER_NAME)
        meta = {"model_type": "prunedrive-driving-llm", **asdict(self.config), "parameters": self.num_parameters()}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "DrivingLLM":
        """Load a model saved by `save_pretrained` from a local directory (safetensors only, no pickle)."""
        path = Path(directory).expanduser()
        how = ("DrivingLLM models are trained locally with `prunedrive train` and loaded from a directory "
               "(containing config.json, model.safetensors, tokenizer.json); nothing is downloaded")
        if not path.exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+", str(directory)) and not str(directory).startswith((".", "/")):
                raise ValueError(f"{directory!r} looks like a model hub name, not a local directory. {how}.")
            raise FileNotFoundError(f"no model directory at {str(path)!r}. {how}.")
        if not path.is_dir():
            raise ValueError(f"{str(path)!r} is not a directory. {how}.")
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME) if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(path)!r} lacks {', '.join(missing)}. {how}.")
        try:
            meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path / CONFIG_NAME}: not valid JSON ({exc}). {how}.") from None
        if not isinstance(meta, dict) or meta.get("model_type") != "prunedrive-driving-llm":
            raise ValueError(f"{path / CONFIG_NAME} is not a prunedrive driving LLM config. {how}.")
        known = DrivingLLMConfig.__dataclass_fields__
        try:
            config = DrivingLLMConfig(**{k: v for k, v in meta.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path / CONFIG_NAME}: bad field ({exc})") from None
        try:
            tokenizer = DrivingTokenizer.from_file(path / TOKENIZER_NAME)
        except Exception as exc:  # noqa: BLE001 -- the tokenizers library raises its own exception types
            raise ValueError(f"{path / TOKENIZER_NAME}: not a readable tokenizer ({exc})") from None
        from prunedrive.models.compressed_load import is_compressed_checkpoint

        compressed = is_compressed_checkpoint(path)
        _check_weight_shapes(cls, config, tokenizer, path / WEIGHTS_NAME, compressed)
        model = cls(config, tokenizer)
        if compressed:  # prunedrive prune's default layout: sparse weights in the compressed-tensors format
            model.compression = _load_compressed_weights(model, path)
        else:
            load_model(model, str(path / WEIGHTS_NAME), strict=True)
        model.eval()
        return model


def _load_compressed_weights(model: nn.Module, path: Path) -> dict:
    """Decompress a compressed-tensors checkpoint into `model` (bit-identical weights); its record (scheme,
    execution, bytes on disk and in memory) for cost tables."""
    from prunedrive.models.compressed_load import load_dense_state_dict, load_state_into

    loaded = load_dense_state_dict(path)
    load_state_into(model, loaded.state_dict, str(path))
    return loaded.record()


def _check_weight_shapes(cls, config: DrivingLLMConfig, tokenizer: DrivingTokenizer, weights: Path,
                         compressed: bool = False) -> None:
    """Compare the shapes the config implies (a model built on the meta device: no memory) with the
    safetensors header before anything is allocated: a config that promises a huge model over a small
    or torn weights file is an error naming the file, not gigabytes of allocation. A compressed checkpoint's
    dense shapes come from its headers and shape tensors (models.compressed_load.stored_dense_shapes)."""
    from safetensors import SafetensorError, safe_open

    from prunedrive.models.compressed_load import stored_dense_shapes

    try:
        if compressed:
            stored = stored_dense_shapes(weights.parent)
        else:
            with safe_open(str(weights), framework="pt") as handle:
                stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from None
    try:
        with torch.device("meta"):
            model = cls(config, tokenizer)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{weights.parent / CONFIG_NAME}: the config does not describe a buildable model ({exc})") from None
    # Tied weights (embeddings and lm_head) are stored once under one of their names: group names by tensor.
    groups: dict[int, list[str]] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    persistent = set(model.state_dict())
    for name, tensor in tensors:
        if name in persistent:
            groups.setdefault(id(tensor), []).append(name)
    shapes = {id(t): tuple(t.shape) for _, t in tensors}
    problems = []
    for key, names in groups.items():
        found = [n for n in names if n in stored]
        if not found:
            problems.append(f"missing {names[0]}")
        elif stored[found[0]] != shapes[key]:
            problems.append(f"{found[0]}: stored {stored[found[0]]}, config says {shapes[key]}")
    known = {n for names in groups.values() for n in names}
    problems += [f"unexpected {n}" for n in sorted(set(stored) - known)]
    if problems:
        raise ValueError(f"{weights} does not match {weights.parent / CONFIG_NAME}: {'; '.join(problems[:4])}")
