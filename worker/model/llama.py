"""The Llama family over a paged KV cache: RMSNorm, rotary embeddings (with the config's
scaling), grouped-query attention, SwiGLU, tied or untied embeddings.

Tokens of all scheduled sequences are flattened into one batch of `T` tokens; attention
reads keys and values of every sequence through its block table (see attention.py).
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .attention import AttentionMetadata, paged_attention, store_kv

# the dtypes a model runs in, by the names configs and the KV stream header use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
        c = json.loads(path.read_text())
        arch = c.get("architectures") or ["LlamaForCausalLM"]
        if c.get("model_type", "llama") != "llama" or arch[0] != "LlamaForCausalLM":
            raise ValueError(f"unsupported architecture {arch[0]!r} (model_type {c.get('model_type')!r}); "
                             "this worker serves the Llama family")
        for key in ("attention_bias", "mlp_bias"):
            if c.get(key):
                raise ValueError(f"{key}=true is not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported (Llama uses silu)")
        # transformers 5 writes rope_parameters (theta inside); older files use rope_scaling + rope_theta
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rope_type == "default" else rope
        eos = c.get("eos_token_id")
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.exists():
            eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
        eos = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=c.get("tie_word_embeddings", False), eos_token_ids=eos,
            bos_token_id=c.get("bos_token_id"),
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        store_kv(k, v, k_cache, v_cache, meta)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(cfg)  # float32 at every model dtype, as in the reference

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed_tokens.weight.dtype
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, logits_indices: torch.Tensor,
                layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Returns float32 logits for the tokens at `logits_indices` only; calls
        `layer_done(i)` once layer i has written its keys and values (queued them, on a GPU)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, cos, sin, kv_cache, meta)
            if layer_done is not None:
                layer_done(i)
        x = self.norm(x[logits_indices])
        return self.lm_head(x).float()

    def load_weights(self, model_dir: str | Path) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        with torch.no_grad():
            for f in files:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():  # noqa: SIM118 - a safetensors file, not a dict
                        if "rotary_emb" in name:
                            continue
                        tensor = sf.get_tensor(name)
                        target = name.removeprefix("model.")
                        parts = target.split(".")
                        if len(parts) >= 2 and parts[-2] in fused:
                            fused_name, shard = fused[parts[-2]]
                            target = ".".join(parts[:-2] + [fused_name, parts[-1]])
                            self._load_shard(params, target, shard, tensor)
                            loaded.add(f"{target}#{shard}")
                            continue
                        if target not in params:
                            raise ValueError(f"unexpected tensor {name!r} in {f.name}")
                        if params[target].shape != tensor.shape:
                            raise ValueError(f"{name}: shape {tuple(tensor.shape)} in file, "
                                             f"model expects {tuple(params[target].shape)}")
                        params[target].copy_(tensor)
                        loaded.add(target)
            if self.cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
                self.lm_head.weight = self.embed_tokens.weight
                loaded.add("lm_head.weight")
        expected = set()
        for pname in params:
            key = pname.rsplit(".", 2)
            if key[-2] == "qkv_proj":
                expected |= {f"{pname.rsplit('.', 1)[0]}.weight#{i}" for i in range(3)}
            elif key[-2] == "gate_up_proj":
                expected |= {f"{pname.rsplit('.', 1)[0]}.weight#{i}" for i in range(2)}
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"model files lack {len(missing)} tensors, e.g. {missing[:3]}")

    def _load_shard(self, params, target: str, shard: int, tensor: torch.Tensor) -> None:
        param = params[target]
        c = self.cfg
        if target.endswith("qkv_proj.weight"):  # as Attention fuses them: q, k, v
            sizes = [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
        else:
            sizes = [c.intermediate_size] * 2
        start = sum(sizes[:shard])
        if tensor.shape != (sizes[shard], param.shape[1]):
            raise ValueError(f"{target} shard {shard}: shape {tuple(tensor.shape)}, "
                             f"expected {(sizes[shard], param.shape[1])}")
        param[start:start + sizes[shard]].copy_(tensor)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.load_weights(model_dir)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model
