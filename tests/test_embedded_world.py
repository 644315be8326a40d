from pathlib import Path

from draftalign.data.corpus import stdlib_files, stdlib_root
from draftalign.data.split import is_holdout
from draftalign.data.tokenization import load_tokenizer, materialize_tokenizer, vocab_fingerprint


def test_embedded_tokenizer_roundtrips_and_has_chat_template(tmp_path):
    d = materialize_tokenizer("embedded", tmp_path / "tok")
    tok = load_tokenizer(d)
    assert len(tok) == 32000 and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    text = "def merge(a, b):\n    return sorted(a + b)  # héllo"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Explain zip()."}], tokenize=False)
    assert chat == "<s>[INST] Explain zip(). [/INST]"
    # Loading the saved folder again gives the same ids (what vLLM and transformers will see).
    assert load_tokenizer(d)(text, add_special_tokens=False)["input_ids"] == ids
    assert vocab_fingerprint(tok) == vocab_fingerprint(load_tokenizer(d))


def test_stdlib_corpus_found_from_the_interpreter():
    files = stdlib_files()
    root = stdlib_root()
    rel = [str(p.relative_to(root)) for p in files]
    assert "json/decoder.py" in rel and len(files) > 300
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in Path(r).parts)


def test_holdout_split_is_stable_and_about_the_right_size():
    keys = [f"doc{i}" for i in range(20000)]
    held = [k for k in keys if is_holdout(k, 0.05)]
    assert 800 < len(held) < 1200
    assert held == [k for k in keys if is_holdout(k, 0.05)]
    assert not any(is_holdout(k, 0.0) for k in keys[:100])
