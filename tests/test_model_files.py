"""`fleetwise model init` output: deterministic, loadable by transformers, tokenizer round trips."""

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from fleetwise.cli import app
from fleetwise.worker.model.files import ID_CACHE, model_id, write_model
from fleetwise.worker.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["hello world", "café naïve über", "你好，世界", "emoji 🙂🚀 and ✓", "tabs\tand\nnewlines  ",
         "<|eot_id|> is text here", "ß" * 7, "\u0000\u0001 control", "mixed 42 ünïcödé 日本語テキスト"]


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_cli_writes_the_same_files_for_the_same_seed(tmp_path):
    runner = CliRunner()
    for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]:
        result = runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(tmp_path / name),
                                     "--seed", seed])
        assert result.exit_code == 0, result.output
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a")["model.safetensors"] != digest(tmp_path / "c")["model.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(digest(tmp_path / "a"))
    bad = runner.invoke(app, ["model", "init", "--preset", "huge", "--out", str(tmp_path / "d")])
    assert bad.exit_code != 0 and "unknown preset" in bad.output


def test_small_preset_has_tens_of_millions_of_parameters(tmp_path):
    from safetensors import safe_open
    path = write_model(tmp_path / "small", "small")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        total = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys())  # noqa: SIM118 - a safetensors file, not a dict
    assert 10e6 < total < 100e6


def test_tokenizer_round_trips_utf8_and_matches_transformers(tiny_model_dir):
    from transformers import AutoTokenizer
    ours = Tokenizer(tiny_model_dir)
    theirs = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids
        assert ids[0] == ours.token_to_id("<|begin_of_text|>")
        assert ours.decode(ids) == text.replace("<|eot_id|>", "")  # specials are skipped on decode
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_chat_template_matches_transformers(tiny_model_dir):
    from transformers import AutoTokenizer
    ours = Tokenizer(tiny_model_dir)
    theirs = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi 🙂"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, gen) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)


def test_incremental_detokenizer_never_splits_a_character(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    rng = random.Random(0)
    for text in TEXTS * 3:
        prompt = tok.encode("prefix ")
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok)
        detok.start(prompt)
        seq = list(prompt)
        deltas = []
        for t in ids:
            seq.append(t)
            deltas.append(detok.step(seq))
        deltas.append(detok.flush(seq))
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in d for d in deltas), deltas
    # random byte-level tokens (often broken UTF-8): what was emitted is never taken back
    vocab = tok.vocab_size
    for _ in range(50):
        ids = [rng.randrange(5, vocab) for _ in range(30)]
        detok = IncrementalDetokenizer(tok)
        detok.start([0])
        seq, out, emitted = [0], "", []
        for t in ids:
            seq.append(t)
            out += detok.step(seq)
            emitted.append(out)
        out += detok.flush(seq)
        assert out == tok.decode(seq[1:])
        assert all(out.startswith(e) for e in emitted)


def test_config_errors_are_clear(tmp_path, tiny_model_dir):
    from fleetwise.worker.model.llama import ModelConfig
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_dir(tmp_path)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_dir(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(ValueError, match="yarn"):
        from fleetwise.worker.model.llama import rope_inv_freq
        rope_inv_freq(ModelConfig.from_dir(bad))


def flip_middle_byte(model_dir) -> None:
    """One byte in the middle of the weights: far from the header and the first and last MiB."""
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    middle = header + (len(data) - header) // 2
    assert middle - header > 1 << 20 and len(data) - middle > 1 << 20, "the weights should be over 2 MiB"
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))


def test_model_id_tells_apart_models_that_differ_in_one_byte(tmp_path):
    base = write_model(tmp_path / "base", "tiny", intermediate_size=2048)  # ~3.5 MB of weights
    tuned = tmp_path / "tuned"
    shutil.copytree(base, tuned)
    assert model_id(tuned) == model_id(base)
    flip_middle_byte(tuned)
    assert model_id(tuned) != model_id(base)


def test_model_id_is_cached_beside_the_model_until_a_file_changes(tmp_path):
    model = write_model(tmp_path / "m", "tiny")
    first = model_id(model)
    cache = model / ID_CACHE
    stored = json.loads(cache.read_text())
    assert stored["id"] == first
    cache.write_text(json.dumps({**stored, "id": "from-the-cache"}))
    assert model_id(model) == "from-the-cache"  # not read again
    time.sleep(0.01)
    (model / "model.safetensors").touch()  # the weights may have changed: hashed again
    assert model_id(model) == first
    assert json.loads(cache.read_text())["id"] == first


def test_model_id_on_a_read_only_model_directory(tmp_path):
    """Model files on a read-only image or volume: the id is computed, nothing is written."""
    model = write_model(tmp_path / "m", "tiny")
    expected = model_id(shutil.copytree(model, tmp_path / "copy"))
    code = f"from fleetwise.worker.model.files import model_id; print(model_id({str(model)!r}))"
    if os.geteuid() == 0:  # permissions do not stop root: a read-only bind mount in a mount namespace
        if shutil.which("unshare") is None or subprocess.run(
                ["unshare", "-m", "true"], capture_output=True).returncode != 0:
            pytest.skip("root without mount namespaces: no way to make a read-only directory")
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$1" -c "$2"',
                str(model), sys.executable, code]
    else:
        model.chmod(0o555)
        argv = [sys.executable, "-c", code]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        model.chmod(0o755)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected
    assert not (model / ID_CACHE).exists()
    assert not [p for p in model.iterdir() if p.name.endswith(".tmp")]
