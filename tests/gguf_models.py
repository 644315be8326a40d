"""Tiny models written as GGUF files, the way llama.cpp lays them out, for the import tests: a
Llama (hand-mapped), and one of each other family (Qwen 2 and 3, Mistral, Gemma 3) mapped with
the `gguf` package's own tensor names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: bos, -, eos
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens with a small model and checks them with a large one.",
    "A draft model that agrees with its target often makes decoding faster.",
    "Hello world! How are you today? 0123456789",
    "def main():\n    return sum(range(10))\n",
]


def _bpe(specials: list[str] = SPECIALS) -> tuple[list[str], list[str]]:
    """Tokens and merges of a byte-level BPE trained here: trained, not hand-made, so every
    merge produces a token of the vocabulary, as a real file's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's own pre-tokenizer: transformers rebuilds a `gpt2` GGUF tokenizer (with no
    # `tokenizer.ggml.pre`) as GPT2Tokenizer, which splits text the same way.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT * 4, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (rotary halves -> interleaved
    pairs); transformers' LlamaTensorProcessor undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str | Path, seed: int = 0) -> dict:
    """Write a 2-layer F32 Llama GGUF (untied output, ChatML template) at `path`.

    Returns the random weights in Hugging Face naming (torch tensors, Q/K not permuted), so a
    test can check what the loader made of them."""
    import gguf
    import torch

    tokens, merges = _bpe()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)  # not all ones: a swap would show

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(vocab, HIDDEN)}
    ggml: dict[str, np.ndarray] = {"token_embd.weight": hf["model.embed_tokens.weight"]}
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        layer = {
            "self_attn.q_proj.weight": ("attn_q.weight", rand(HEADS * HEAD_DIM, HIDDEN)),
            "self_attn.k_proj.weight": ("attn_k.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN)),
            "self_attn.v_proj.weight": ("attn_v.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN)),
            "self_attn.o_proj.weight": ("attn_output.weight", rand(HIDDEN, HEADS * HEAD_DIM)),
            "input_layernorm.weight": ("attn_norm.weight", norm()),
            "mlp.gate_proj.weight": ("ffn_gate.weight", rand(FFN, HIDDEN)),
            "mlp.up_proj.weight": ("ffn_up.weight", rand(FFN, HIDDEN)),
            "mlp.down_proj.weight": ("ffn_down.weight", rand(HIDDEN, FFN)),
            "post_attention_layernorm.weight": ("ffn_norm.weight", norm()),
        }
        for name, (gname, w) in layer.items():
            hf[p + name] = w
            ggml[b + gname] = w
        ggml[b + "attn_q.weight"] = _permute(hf[p + "self_attn.q_proj.weight"], HEADS)
        ggml[b + "attn_k.weight"] = _permute(hf[p + "self_attn.k_proj.weight"], KV_HEADS)
    hf["model.norm.weight"] = ggml["output_norm.weight"] = norm()
    hf["lm_head.weight"] = ggml["output.weight"] = rand(vocab, HIDDEN)  # present: embeddings untied

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in ggml.items():
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(v.copy()) for k, v in hf.items()}


# family -> (llama.cpp's architecture, its general.name): llama.cpp writes Mistral as `llama`, and
# transformers tells it apart by the name.
GGUF_ARCH = {"qwen2": ("qwen2", "tiny-qwen2"), "qwen3": ("qwen3", "tiny-qwen3"),
             "mistral": ("llama", "tiny-mistral"), "gemma3": ("gemma3", "tiny-gemma3")}


def _family_model(family: str, tokens: list[str], specials: list[str], seed: int):
    """The random Hugging Face model a family's GGUF file holds, with what its metadata can carry:
    GGUF has no head_dim for Qwen 3 (its loader takes the config's default, 128) and no per-layer
    attention types or query scale for Gemma 3 (defaults too)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.families import FAMILIES, model_config

    f = FAMILIES[family]
    overrides = dict(num_hidden_layers=LAYERS, max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "qwen3":
        overrides["head_dim"] = 128
    if family == "gemma3":
        overrides.update(layer_types=None, query_pre_attn_scalar=256, sliding_window=16, rope_parameters=None)
    if family == "mistral":
        overrides["sliding_window"] = None
    config = model_config(f, len(tokens), tokens.index(specials[0]), tokens.index(specials[1]), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms not all ones (nor zeros: Gemma's offset), so a swap would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _ggml_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """`model`'s weights under llama.cpp's tensor names, as its converter stores them."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.numpy().copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # undone by the loader
            w = _permute(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):  # llama.cpp stores Gemma's 1 + w
            w = w + 1.0
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = w.astype(np.float32)
    return out


def _write_metadata(w, cfg, arch: str, name: str, template: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    theta = (cfg.rope_parameters or {}).get("rope_theta")
    if theta is not None and "full_attention" not in cfg.rope_parameters:
        w.add_rope_freq_base(float(theta))
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if arch == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_chat_template(template)


def write_family_gguf(path: str | Path, family: str, seed: int = 0):
    """Write a 2-layer F32 GGUF of `family` (tests/families.py: its config class, special tokens
    and chat template) at `path`; returns the Hugging Face model it holds."""
    import gguf

    from tests.families import FAMILIES

    f = FAMILIES[family]
    # Gemma's tokenizer class needs an unknown token, and adds <mask> where the file has none
    extra = ("<pad>", "<unk>", "<mask>") if family == "gemma3" else ()
    specials = [t for t in (f.bos or "<s>", f.eos or "</s>", *f.specials, f.pad, *extra) if t]
    tokens, merges = _bpe(specials)
    model = _family_model(family, tokens, specials, seed)
    arch, name = GGUF_ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    _write_metadata(w, model.config, arch, name, f.template)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(specials[0]))
    w.add_eos_token_id(tokens.index(specials[1]))
    if "<unk>" in specials:
        w.add_unk_token_id(tokens.index("<unk>"))
    for tname, t in _ggml_tensors(model, arch).items():
        w.add_tensor(tname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
