"""Model directories in Hugging Face layout: writes randomly initialised Llama models
(`fleetwise model init`) and names a model's files by a digest (`model_id`).

A written directory holds config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and generation_config.json, and loads unchanged in Hugging Face
`transformers`.
"""

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass
class Preset:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: dict | None = field(default=None)


PRESETS = {
    # Loads in well under a second; used by the tests.
    "tiny": Preset(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   tie_word_embeddings=False),
    # Tens of millions of parameters; used by the benchmarks.
    "small": Preset(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                    tie_word_embeddings=False, rope_theta=500000.0),
}

_WORDS = ["the", "model", "serves", "tokens", "to", "many", "users", "at", "once", "while", "the", "scheduler", "keeps", "the", "batch", "full", "prompts", "arrive", "from", "the", "router", "and", "a", "prefill", "worker", "computes", "the", "cache", "blocks", "before", "a", "decode", "worker", "generates", "the", "answer", "power", "budgets", "limit", "what", "each", "rack", "may", "draw", "and", "a", "faulty", "node", "shows", "up", "as", "the", "odd", "one", "out", "among", "its", "peers", "kubernetes", "places", "pods", "on", "nodes", "with", "free", "gpus", "def", "return", "import", "class", "for", "while", "if", "else", "yield", "lambda", "async", "await", "json", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "42", "100", "2048", "café", "naïve", "über", "résumé", "你好", "世界", "こんにちは", "🙂", "🚀", "✓", "—", "ß"]


_SYLLABLES = ["ka", "ri", "to", "ne", "sa", "mi", "lo", "ve", "du", "pa", "stra", "gen", "tion", "ing", "er", "ly", "ex", "pro", "con", "bi", "the", "qu", "zo", "ff", "sch", "ach", "ei", "au", "ou", "ph", "ck", "ll", "ss", "str"]


def _corpus(seed: int, lines: int = 6000) -> list[str]:
    """Text to train the tokenizer on: real words and enough invented ones (syllable
    strings) for the larger vocabularies to fill up."""
    rng = random.Random(seed)
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(6000)]
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) if rng.random() < 0.5 else rng.choice(invented)
                 for _ in range(rng.randint(4, 16))]
        sep = rng.choice([" ", " ", " ", ", ", "_", "."])
        out.append(sep.join(words) + rng.choice([".", "!", "?", ":", "\n", " {}", "()"]))
    return out


def build_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """A byte-level BPE tokenizer: every UTF-8 string round-trips through encode/decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def _init_weights(p: Preset, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled so that every layer matters and greedy choices are not near-ties.

    Every projection has std 1/sqrt(fan_in), so attention and MLP outputs are as large as
    the unit-std embeddings they are added to: the next token depends on the context, not
    only on the current token (small init gives a bigram model that repeats itself). The
    untied head spreads logits by a few units, so the top two rarely come within float32
    rounding of each other. A tied head would score the current token highest every time.
    """
    g = torch.Generator().manual_seed(seed)
    head_dim = p.hidden_size // p.num_attention_heads
    kv = p.num_key_value_heads * head_dim

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f ** 0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    w = {"model.embed_tokens.weight": torch.randn(vocab, p.hidden_size, generator=g)}
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        w[pre + "input_layernorm.weight"] = norm(p.hidden_size)
        w[pre + "self_attn.q_proj.weight"] = linear(p.hidden_size, p.hidden_size)
        w[pre + "self_attn.k_proj.weight"] = linear(kv, p.hidden_size)
        w[pre + "self_attn.v_proj.weight"] = linear(kv, p.hidden_size)
        w[pre + "self_attn.o_proj.weight"] = linear(p.hidden_size, p.hidden_size)
        w[pre + "post_attention_layernorm.weight"] = norm(p.hidden_size)
        w[pre + "mlp.gate_proj.weight"] = linear(p.intermediate_size, p.hidden_size)
        w[pre + "mlp.up_proj.weight"] = linear(p.intermediate_size, p.hidden_size)
        w[pre + "mlp.down_proj.weight"] = linear(p.hidden_size, p.intermediate_size)
    w["model.norm.weight"] = norm(p.hidden_size)
    if not p.tie_word_embeddings:
        w["lm_head.weight"] = torch.randn(vocab, p.hidden_size, generator=g) / p.hidden_size ** 0.25
    return {k: v.contiguous() for k, v in w.items()}


def write_model(out: str | Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Write a model directory; `overrides` replace preset fields (e.g. rope_scaling)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = Preset(**{**asdict(PRESETS[preset]), **overrides})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(p.vocab_size, seed)
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    bos_id, eos_id, eot_id = (tok.token_to_id(t) for t in (BOS, EOS, EOT))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.hidden_size // p.num_attention_heads,
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": p.rope_scaling,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": p.tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": [eos_id, eot_id],
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": [eos_id, eot_id], "do_sample": False}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": EOS,
        "model_max_length": p.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    save_file(_init_weights(p, vocab, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


ID_CACHE = ".fleetwise-model-id.json"  # beside the model, where the worker may write


def model_id(model_dir: str | Path) -> str:
    """Identifies a model by a SHA-256 of config.json and every byte of its safetensors files:
    a fine-tuned model has its base model's names and shapes, and only its bytes tell them
    apart (a worker must never take another model's keys and values).

    Reading every byte takes a while for a large model, so the answer is kept in a file in
    the model directory, valid while each file's size, times and inode are unchanged. Model
    files may sit on a read-only image or volume: then the digest is computed at each start."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]
    stamp = [[f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for f in files for st in [f.stat()]]
    cache = model_dir / ID_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached["files"] == stamp:
            return str(cached["id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: computed below
    t0 = time.monotonic()
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()  # streamed in chunks
        h.update(f"{f.name}\0{f.stat().st_size}\0{digest}\n".encode())
    mid = h.hexdigest()[:32]
    log.info("model id %s: %d files hashed in %.1f s", mid, len(files), time.monotonic() - t0)
    _write_cache(cache, {"id": mid, "files": stamp})
    return mid


def _write_cache(path: Path, content: dict) -> None:
    """Atomically, or not at all (a read-only directory, another worker racing: both fine)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as e:
        log.info("the model id is not cached beside the model (%s); it is computed at each start", e)
        return
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(content, out)
        os.replace(tmp, path)
    except OSError as e:
        log.info("could not cache the model id beside the model: %s", e)
        Path(tmp).unlink(missing_ok=True)
