"""Tokenizers: the embedded SentencePiece model, any HF tokenizer, and the chat template.

The embedded default must work offline, so it uses the Llama-2-family SentencePiece model
(32,000 tokens, byte fallback) that the `mistral_common` package ships. It is loaded with
`LlamaTokenizer` (AutoTokenizer on the bare .model file treats a leading word differently)
and saved next to every model, so transformers and vLLM always load the same one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

# Llama 2 chat format (paper-spec section 4): <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

EMBEDDED_MODEL = ("mistral_common", "data/tokenizer.model.v1")


def ensure_chat_template(tok: PreTrainedTokenizerBase, mode: str = "auto") -> PreTrainedTokenizerBase:
    """Give `tok` Llama 2's chat template when it has none, or always when mode is "llama2"."""
    if mode == "llama2" or not getattr(tok, "chat_template", None):
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return tok


def embedded_model_file() -> Path:
    pkg, rel = EMBEDDED_MODEL
    try:
        path = Path(str(resources.files(pkg) / rel))
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"the embedded tokenizer lives in the package {pkg!r}, which is not installed; "
            "install the project with its cpu or gpu extra (it comes with vLLM)"
        ) from exc
    if not path.is_file():
        raise RuntimeError(f"{pkg} is installed but ships no {rel}; set tokenizer.source to a tokenizer folder")
    return path


def materialize_tokenizer(source: str, dest: str | Path, chat_template: str = "auto") -> Path:
    """Write the tokenizer named by `source` into `dest` (a HF tokenizer folder) and return it."""
    dest = Path(dest)
    if (dest / "tokenizer_config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if source == "embedded":
        shutil.copyfile(embedded_model_file(), tmp / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(tmp))
    else:
        tok = AutoTokenizer.from_pretrained(source)
    ensure_chat_template(tok, chat_template).save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # atomic: a half-written tokenizer folder is never picked up
    return dest


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def vocab_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A short hash of the token-to-id map, to compare tokenizers without shipping them."""
    data = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()[:16]
