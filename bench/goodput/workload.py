"""The goodput benchmark's workload: prefix-skewed prompts with the Azure code trace's lengths.

Every prompt is one of a few long shared system prompts, picked by Zipf popularity, followed
by a suffix of its own; the suffix's length and the output's length come from a row of the
Azure LLM inference trace 2023, code file (its contexts are long and its outputs short, as
a coding assistant's are), scaled to the CPU model's context. Prompts are words the small
preset's tokenizer reads as about one token each, so lengths in words are lengths in tokens.

Two shapes: `Shape()` for the fleet of CPU workers (the small model's real forward pass), and
`MODELLED` for the fleet of modelled GPUs (modelled_device.py), whose steps take what a 70B
model's take on A100s, so the prompts can be as long as a coding assistant's: system prompts of
1-2k tokens, suffixes a quarter of the trace's context.

Each (load, repeat) turn gets system prompts of its own (the same lengths and popularity,
other words), so no system finds the workers' caches warmed by the one before it; every
system sees the same turn's prompts, in the same order, at the same times.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_FILE = "AzureLLMInferenceTrace_code.csv"
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "data" / "azure-llm-trace-2023" / TRACE_FILE
WORDS = ["the", "model", "serves", "tokens", "to", "many", "users", "at", "once", "while", "scheduler", "keeps",
         "batch", "full", "prompts", "arrive", "from", "router", "and", "a", "prefill", "worker", "computes",
         "cache", "blocks", "before", "decode", "generates", "answer", "power", "budgets", "limit", "what",
         "each", "rack", "may", "draw", "faulty", "node", "shows", "up", "as", "odd", "one", "out", "among",
         "its", "peers", "kubernetes", "places", "pods", "on", "nodes", "with", "free", "gpus", "def", "return",
         "import", "class", "for", "if", "else", "yield", "lambda", "async", "await", "json"]


@dataclass(frozen=True)
class Shape:
    """What the workload looks like; every run states it."""
    system_prompts: int = 8          # shared system prompts
    zipf_s: float = 1.1              # popularity of the k-th: 1 / k^s
    system_words: tuple[int, int] = (256, 512)   # each system prompt's length, uniform in this range
    suffix_scale: float = 0.03       # the trace's context tokens times this: the unique suffix
    suffix_words: tuple[int, int] = (8, 192)
    output_tokens: tuple[int, int] = (4, 32)     # the trace's generated tokens, clipped

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


MODELLED = Shape(system_prompts=16, system_words=(1024, 2048), suffix_scale=0.25, suffix_words=(32, 1024),
                 output_tokens=(4, 64))


@dataclass(frozen=True)
class Request:
    at: float            # seconds after the turn's start
    prompt: str
    max_tokens: int
    rank: int            # which system prompt (0: the most popular)
    prompt_words: int


def read_code_lengths(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Context and generated tokens of every row of the code trace."""
    path = Path(path) if path else DEFAULT_TRACE
    if not path.is_file():
        raise SystemExit(f"error: the Azure code trace is missing: {path} (pass --trace PATH/{TRACE_FILE}; the "
                         "repository keeps a copy in data/azure-llm-trace-2023/)")
    ctx, gen = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    return np.array(ctx), np.array(gen)


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def system_prompts(shape: Shape, seed: int, salt: int) -> list[str]:
    """The turn's system prompts: lengths from `seed` alone, words from `seed` and `salt`."""
    lengths = np.random.default_rng(seed).integers(shape.system_words[0], shape.system_words[1] + 1,
                                                   shape.system_prompts)
    rng = np.random.default_rng([seed, salt, 1])
    return [f"system {salt}.{k}: " + _words(rng, int(n)) for k, n in enumerate(lengths)]


def poisson_times(rate: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    gaps = rng.exponential(1.0 / rate, int(rate * seconds * 2 + 20))
    t = np.cumsum(gaps)
    return t[t < seconds]


def turn_requests(shape: Shape, lengths: tuple[np.ndarray, np.ndarray], rate: float, seconds: float,
                  seed: int, turn: int, words: int) -> list[Request]:
    """One turn's requests: Poisson arrivals at `rate` for `seconds`, each a Zipf-picked system
    prompt and a trace row's suffix and output lengths. Arrivals, system prompts picked and
    lengths depend on (`seed`, `turn`) alone; the words on `words` too."""
    times = poisson_times(rate, seconds, seed * 1000 + turn)
    pick = np.random.default_rng([seed, turn, 3])
    text = np.random.default_rng([seed, turn, words, 4])
    systems = system_prompts(shape, seed, turn * 1000 + words)
    ranks = pick.choice(len(systems), size=len(times), p=zipf_weights(len(systems), shape.zipf_s))
    rows = pick.integers(0, len(lengths[0]), len(times))
    out = []
    for at, rank, row in zip(times, ranks, rows):
        suffix = int(np.clip(lengths[0][row] * shape.suffix_scale, *shape.suffix_words))
        tokens = int(np.clip(lengths[1][row], *shape.output_tokens))
        prompt = systems[rank] + "\nuser: " + _words(text, suffix)
        out.append(Request(float(at), prompt, tokens, int(rank), len(prompt.split())))
    return out
