"""Model configs: named presets, drafters derived from a target, checks.

The presets (and so a drafter pretrained on a corpus) are Llama models, the paper's; a drafter
cut from a target is of the target's own class and config, whatever its family. No weights
are loaded here except where a function says so. Speculative decoding needs the draft to share
the target's tokenizer, vocabulary and special tokens, so every drafter is derived from its
target's config.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, LlamaConfig, PretrainedConfig

from draftalign.errors import VocabMismatchError

# Architecture fields only; vocabulary, special tokens and max positions come from the
# tokenizer (for a target built from scratch) or from the target (for a drafter).
PRESETS: dict[str, dict[str, Any]] = {
    # Goel et al. 2024 (paper-spec section 2): 4 layers, hidden 1024, MLP 2816, 8 heads, untied.
    "llama2-chat-drafter-115m": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8,
    ),
    # Llama 2 7B's shape, for plans and for a target that is trained rather than downloaded.
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    ),
    # The embedded world. Head size 32: vLLM's CPU attention refuses 16.
    "toy-target": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
    ),
    # A drafter for SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary 49,152, tied): at
    # this vocabulary the output layer dominates a small model's cost, so two thin layers and
    # tied embeddings keep it near a tenth of the target (14.3M parameters, c = 0.106).
    # Head size 64, as the target's.
    "smollm2-drafter": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
    ),
    "toy-drafter": dict(
        hidden_size=128, intermediate_size=352, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    ),
}

_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
# Fields a drafter must take from its target so both can serve in one speculative engine.
SHARED_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def preset_names() -> list[str]:
    return sorted(PRESETS)


def build_config(preset: str | None, overrides: dict[str, Any] | None = None, **shared: Any) -> LlamaConfig:
    """A LlamaConfig from a preset, the shared fields (vocab, special ids...) and overrides."""
    fields: dict[str, Any] = dict(_COMMON)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(preset_names())}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in shared.items() if v is not None})
    unknown = sorted(set(overrides or {}) - set(LlamaConfig().to_dict()))
    if unknown:
        raise ValueError(f"unknown LlamaConfig field(s) in arch.overrides: {', '.join(unknown)}")
    fields.update(overrides or {})
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return LlamaConfig(**fields)


def shared_fields(target: PretrainedConfig) -> dict[str, Any]:
    return {name: getattr(target, name, None) for name in SHARED_FIELDS}


def drafter_config(target: PretrainedConfig, preset: str | None = "llama2-chat-drafter-115m",
                   overrides: dict[str, Any] | None = None) -> LlamaConfig:
    """Derive a drafter for `target`: its tokenizer's vocabulary, special ids and max positions."""
    return build_config(preset, overrides, **shared_fields(target))


def project_embeddings(weight: torch.Tensor, hidden: int) -> torch.Tensor:
    """The target's input embeddings [V, H] as a drafter's [V, hidden] (hidden <= H).

    The best rank-`hidden` view of E = U S Vᵀ is E V_h = U_h S_h: it keeps the directions along
    which the target's tokens differ most, so the drafter starts with the target's notion of
    which tokens are alike instead of noise. With hidden = H it is E itself, rotated (and rescaled).
    """
    vocab, width = weight.shape
    if hidden > width:
        raise ValueError(f"cannot project {width}-wide target embeddings up to {hidden}")
    u, s, _ = torch.linalg.svd(weight.double(), full_matrices=False)
    projected = u[:, :hidden] * s[:hidden]
    # At the target's scale the tied output layer's first logits were so large that training
    # began at a loss of 15 (uniform: ln V = 10.8); rescaled to the usual initialisation's
    # spread (std 0.02), the directions stay and the first loss is that of a fresh model.
    return (projected * (0.02 / projected.std())).to(weight.dtype)


def load_input_embeddings(folder: str) -> torch.Tensor:
    """The input embedding matrix [V, H] of a safetensors model folder, read alone."""
    from pathlib import Path

    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("embed_tokens.weight"):
                    return f.get_tensor(name)
    raise ValueError(f"no embed_tokens weight in the safetensors files of {folder!r}")


def init_embeddings_from(model, target_folder: str) -> None:
    """Copy the target's projected input embeddings into `model` (tied output layer included)."""
    emb = model.get_input_embeddings().weight
    projected = project_embeddings(load_input_embeddings(target_folder).float(), emb.shape[1])
    if projected.shape != emb.shape:
        raise ValueError(f"target embeddings {tuple(projected.shape)} do not fit the drafter's {tuple(emb.shape)}")
    with torch.no_grad():
        emb.copy_(projected)


def parameter_count(model: Any) -> int:
    """Parameters of a built model (torch module)."""
    return sum(p.numel() for p in model.parameters())


def step_weights(model: Any) -> int:
    """The weights one decoding step reads: MBSU's cost model (c = draft's / target's).

    Every parameter, except that of an input embedding table a step reads one row per token,
    unless that table is also the output layer (tied), which reads all of it. The paper counts
    all parameters; the two agree where embeddings are small beside the layers, but not for a
    drafter that carries its target's 49k-token table and only a 2-layer trunk.
    """
    total = parameter_count(model)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb is head else total - emb.numel()


def step_weights_of(path: str, trust_remote_code: bool = False) -> int:
    """:func:`step_weights` of the model saved at `path` (its full-vocabulary head, as vLLM runs it)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(path, trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    return step_weights(model)


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the model `config` describes (its own family's class: a drafter cut from a Qwen
    target is a Qwen model), counted on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return parameter_count(model)


def count_parameters_of(path: str, trust_remote_code: bool = False) -> int:
    """Parameters of the model (any architecture) saved at `path`, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(path, trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    return parameter_count(model)


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def check_compatible(target: PretrainedConfig, draft: PretrainedConfig,
                     target_vocab: dict[str, int] | None = None,
                     draft_vocab: dict[str, int] | None = None) -> None:
    """Raise VocabMismatchError unless `draft` can draft for `target`.

    Checks the embedding sizes, the special token ids and, when given, the tokenizers'
    token-to-id maps: a drafter with the right size but another tokenizer would be
    accepted by the engine and then propose nonsense.
    """
    problems = []
    for name in ("vocab_size", "bos_token_id", "eos_token_id"):
        t, d = getattr(target, name, None), getattr(draft, name, None)
        if t != d:
            problems.append(f"{name}: target {t} != draft {d}")
    if target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab:
        diff = sum(1 for tok, i in target_vocab.items() if draft_vocab.get(tok) != i)
        problems.append(f"tokenizers differ: {diff} of {len(target_vocab)} target tokens map to other ids")
    if problems:
        raise VocabMismatchError("target and draft do not share a vocabulary: " + "; ".join(problems))


def _layer_key(name: str) -> tuple[str, int, str] | None:
    """("model.layers.", 7, "self_attn.q_proj.weight") for a decoder layer's weight, else None."""
    import re

    m = re.match(r"^(.*\blayers\.)(\d+)\.(.*)$", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def target_layers_config(target: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    """The target's own config with only `layers` (in that order) as its decoder layers."""
    n = target.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"target_layers {layers}: the target has layers 0..{n - 1}" + ("" if layers else "; list one"))
    config = target.__class__.from_dict(target.to_dict())
    config.num_hidden_layers = len(layers)
    per_layer = getattr(target, "layer_types", None)  # sliding/full attention per layer, where a model has it
    if isinstance(per_layer, list) and len(per_layer) == n:
        config.layer_types = [per_layer[i] for i in layers]
    return config


def draft_from_target(target: Any, layers: list[int]) -> Any:
    """A drafter cut from `target` (a loaded causal LM): its embeddings, the decoder layers
    `layers` (in that order), its final norm and its output layer, all copied.

    With every layer listed it is the target itself. No corpus pretraining is needed: it starts
    speaking the target's language and distillation teaches the few layers to stand for many.
    """
    from transformers import AutoModelForCausalLM

    config = target_layers_config(target.config, layers)
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    position = {t: j for j, t in enumerate(layers)}
    state = {}
    for name, tensor in target.state_dict().items():
        key = _layer_key(name)
        if key is None:
            state[name] = tensor.clone()
        elif key[1] in position:
            state[f"{key[0]}{position[key[1]]}.{key[2]}"] = tensor.clone()
    missing, unexpected = draft.load_state_dict(state, strict=False)
    # A tied head is not in the state dict twice; everything else must have been copied.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"drafter from target layers {layers}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        draft.tie_weights()
    return draft.eval()
