"""Tiny chat targets of the families people serve (Llama 3, Qwen 2/3, Mistral, Gemma 3).

Each is built from its family's real config class with random weights, at sizes vLLM's CPU
backend takes (head size 32: it refuses 16). No family's own tokenizer can be built offline
except Mistral's (the embedded SentencePiece model *is* Mistral 7B v0.1's), so each world
takes the embedded tokenizer, adds its family's special tokens (turn markers, BOS/EOS) as
single tokens, and carries its family's chat template, condensed from the published one:
what self-instruct and prompt rendering depend on (a system turn or none, how a user turn
opens and ends, the generation prompt) is kept as the family has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Llama 3 (8B Instruct's template): a header per turn, <|eot_id|> ends it.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Qwen 2.5: ChatML with a default system turn when the conversation has none.
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen 3: ChatML, no default system turn; thinking switched off by an empty think block.
QWEN3_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
# Mistral 7B Instruct v0.1: [INST] ... [/INST], no system role (it raises), roles must alternate.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Gemma 3: <start_of_turn>user / model; a system message is folded into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    """One family's world: its config class and fields, special tokens and chat template."""

    name: str
    config: str  # the transformers config class
    template: str
    bos: str | None = None  # a special token added as BOS (None: the embedded <s>)
    eos: str | None = None  # added as EOS (None: the embedded </s>)
    specials: tuple[str, ...] = ()  # other turn markers, each one token
    pad: str | None = None  # added as PAD (Qwen's tokenizer class adds <|endoftext|> if it is missing)
    fields: dict[str, Any] = field(default_factory=dict)
    end: str = ""  # the marker that ends a user turn in its template


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # Llama 3.1 8B's shape: untied head, rope theta 500k with llama3 rope scaling.
    Family("llama", "LlamaConfig", LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
           specials=("<|start_header_id|>", "<|end_header_id|>"), end="<|eot_id|>",
           fields=dict(tie_word_embeddings=False, rope_parameters={
               "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    # Qwen 2.5 0.5B's traits: biases on q/k/v, tied head.
    Family("qwen2", "Qwen2Config", QWEN2_TEMPLATE, eos="<|im_end|>", specials=("<|im_start|>",), pad="<|endoftext|>",
           end="<|im_end|>", fields=dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    # Qwen 3 0.6B's: RMS norms on q and k (no biases), tied head.
    Family("qwen3", "Qwen3Config", QWEN3_TEMPLATE, eos="<|im_end|>", specials=("<|im_start|>",), pad="<|endoftext|>",
           end="<|im_end|>", fields=dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    # Mistral 7B Instruct v0.2's: untied, no sliding window; the tokenizer is its own.
    Family("mistral", "MistralConfig", MISTRAL_TEMPLATE, end="[/INST]",
           fields=dict(tie_word_embeddings=False, sliding_window=None, rope_theta=1000000.0)),
    # Gemma 3 1B's: sliding and full layers, √H embedding scale, (1 + w) norms, q/k norms, tied.
    Family("gemma3", "Gemma3TextConfig", GEMMA3_TEMPLATE, bos="<bos>", eos="<end_of_turn>",
           specials=("<start_of_turn>",), end="<end_of_turn>",
           fields=dict(tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=32,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                       hidden_activation="gelu_pytorch_tanh")),
)}


def family_tokenizer(family: Family, path: Path):
    """The embedded tokenizer with the family's special tokens and chat template, saved in `path`."""
    from transformers import AutoTokenizer

    from draftalign.data.tokenization import materialize_tokenizer

    materialize_tokenizer("embedded", path)
    tok = AutoTokenizer.from_pretrained(str(path))
    added = {"additional_special_tokens": [t for t in (family.bos, family.eos, *family.specials, family.pad) if t]}
    if family.pad:
        added["pad_token"] = family.pad
    if family.bos:
        added["bos_token"] = family.bos
    if family.eos:
        added["eos_token"] = family.eos
    tok.add_special_tokens(added)
    tok.chat_template = family.template
    tok.save_pretrained(str(path))
    return tok


def family_config(family: Family, vocab_size: int, bos: int, eos: int, pad: int | None = None, **overrides: Any):
    import transformers

    cls = getattr(transformers, family.config)
    return cls(**{**_SIZES, **family.fields, "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos,
                  "pad_token_id": pad, **overrides})


def build_family(name: str, path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random `name` target (its family's causal-LM class) with its tokenizer, in `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = FAMILIES[name]
    tok = family_tokenizer(family, path)
    config = family_config(family, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path))
    # The folder's tokenizer, as every stage loads it (the config now names the family), fits the model.
    assert len(AutoTokenizer.from_pretrained(str(path))) == config.vocab_size, name
    return path
