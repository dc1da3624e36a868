"""The model files a benchmark runs on: a preset written once under OUT/models, the token ids
its random prompts may use, and the size of its KV cache per token."""

import json
from pathlib import Path

import numpy as np
from rich.console import Console


def preset_model(out: Path, preset: str, console: Console, context: int | None = None) -> Path:
    """The preset's model under OUT/models, written once (again if its context differs).
    `context`: a longer max_position_embeddings than the preset's, same seed and weights."""
    from fleetwise.worker.model.files import PRESETS, write_model
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    model_dir = out / "models" / (preset if context is None else f"{preset}-ctx{context}")
    want = context or PRESETS[preset].max_position_embeddings
    cfg = model_dir / "config.json"
    if not (cfg.exists() and json.loads(cfg.read_text()).get("max_position_embeddings") == want):
        with console.status(f"writing the {preset} model to {model_dir}"):
            write_model(model_dir, preset, seed=0,
                        **({} if context is None else {"max_position_embeddings": context}))
    return model_dir.resolve()


def special_token_ids(model_dir: Path) -> set[int]:
    """The tokenizer's added special tokens and the BOS/EOS/pad ids of config.json."""
    ids: set[int] = set()
    tok = model_dir / "tokenizer.json"
    if tok.exists():
        data = json.loads(tok.read_text())
        ids |= {t["id"] for t in data.get("added_tokens", []) if t.get("special", True)}
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        ids |= set(v) if isinstance(v, list) else ({v} if v is not None else set())
    return ids


def prompt_token_ids(model_dir: Path) -> np.ndarray:
    """The vocabulary without the special tokens: what random prompts are drawn from."""
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    specials = special_token_ids(model_dir)
    allowed = np.array([i for i in range(vocab) if i not in specials])
    if len(allowed) == 0:
        raise SystemExit("error: the model's vocabulary holds only special tokens")
    return allowed


def kv_bytes_per_token(cfg: dict) -> int:
    """Keys and values of one token over all layers, in float32 (the most any dtype takes)."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 4
