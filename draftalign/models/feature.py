"""The feature drafter (EAGLE-3, Li et al. 2025): a small head that reads the target's own hidden states.

At position t the drafter gets the target's hidden states at a few layers L_1..L_k (the residual
stream entering decoder layer L: Hugging Face's ``output_hidden_states[L]``, what vLLM's
``eagle3`` method reads as its auxiliary hidden states), fuses them with ``fc`` [k·H -> H], and
runs one decoder layer (more if configured) on that together with the embedding of the next
token x_{t+1}. The first layer's attention reads ``[input_layernorm(embed(x_{t+1})),
hidden_norm(h_t)]`` (2H wide) and adds its output to the residual stream that starts at the fused
state (``norm_before_residual``: at the normed one). The final norm and a head over the draft
vocabulary give logits for x_{t+2}.

Chaining γ drafts: the layer's output before the final norm stands in for the target's features at
the next position, paired with the token just drafted. After a verify step the target's features
replace the drafter's own for every accepted position (:class:`FeatureProposer` in
evaluation/featurespec.py does this, as vLLM does).

The folder format is vLLM's (the `speculators` format, ``speculators_model_type: eagle3``):
config.json, safetensors with ``fc``, ``layers.N.*``, ``norm``, ``lm_head`` [V', H] and ``d2t``
(draft id + d2t[draft id] = target id) and ``t2d`` (which target ids the head covers).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from draftalign.models.identity import FEATURE_FORMAT, is_feature_drafter

__all__ = ["FeatureDrafter", "FeatureSpec", "default_layers", "feature_from_target", "feature_parameters",
           "feature_spec", "is_feature_drafter", "load_feature_drafter", "load_feature_spec", "restrict_head",
           "save_feature_drafter", "ttt_mask", "unrolled_logits"]

ARCHITECTURE = "Eagle3Speculator"
# What the layer copies from its target's config; head and MLP sizes are the target's.
_LAYER_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
                 "hidden_act", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def default_layers(num_layers: int) -> list[int]:
    """A low, a middle and a high layer, as EAGLE-3 and vLLM choose them: (2, N // 2, N − 3)."""
    layers = [2, num_layers // 2, num_layers - 3]
    if len(set(layers)) < 3 or min(layers) < 0:  # too shallow for that rule: the first, middle and last
        layers = sorted({0, num_layers // 2, num_layers - 1})
    return layers


@dataclass
class FeatureSpec:
    """What a feature drafter is, besides its weights (config.json holds it in vLLM's format)."""

    layer: dict[str, Any]  # the decoder layer's LlamaConfig fields (the target's sizes)
    target_layers: list[int]  # the aux hidden states it reads: output_hidden_states indices
    decoder_layers: int = 1
    draft_ids: list[int] = field(default_factory=list)  # the head's target ids, ascending ([] : all)
    norm_before_residual: bool = False
    verifier: str = ""  # the target's name or folder, for vLLM's config
    verifier_architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])  # the target's class

    @property
    def hidden(self) -> int:
        return int(self.layer["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.layer["vocab_size"])

    def llama_config(self, decoder_layers: int | None = None) -> LlamaConfig:
        fields = {k: v for k, v in self.layer.items() if v is not None}
        return LlamaConfig(**{**fields, "num_hidden_layers": decoder_layers or self.decoder_layers,
                              "tie_word_embeddings": False})


class FeatureLayer(nn.Module):
    """One Llama decoder layer; the first reads [normed embedding, normed feature] (2H wide)."""

    def __init__(self, config: LlamaConfig, first: bool, norm_before_residual: bool) -> None:
        super().__init__()
        h, d = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.first, self.norm_before_residual = first, norm_before_residual
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        width = 2 * h if first else h
        self.input_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        if first:
            self.hidden_norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(width, self.heads * d, bias=False)
        self.self_attn.k_proj = nn.Linear(width, self.kv_heads * d, bias=False)
        self.self_attn.v_proj = nn.Linear(width, self.kv_heads * d, bias=False)
        self.self_attn.o_proj = nn.Linear(self.heads * d, h, bias=False)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def attention_input(self, hidden: torch.Tensor, emb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(what q, k, v read, the residual stream) for hidden [B, T, H] (and emb [B, T, H])."""
        if not self.first:
            return self.input_layernorm(hidden), hidden
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        return torch.cat([self.input_layernorm(emb), normed], dim=-1), residual

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, heads, T, d], k and v [B, kv_heads, T, d], rotary positions applied."""
        b, t, _ = x.shape
        a = self.self_attn
        q = a.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def finish(self, q, k, v, mask: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Attention of q over (k, v) where mask [T, S] (or [B, 1, T, S]) allows, then the MLP."""
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        hidden = residual + self.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class FeatureDrafter(nn.Module):
    """fc, the decoder layer(s), the final norm and the draft-vocabulary head (see module doc)."""

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        # its own copy: restrict_head changes the drafter's spec, never the caller's
        spec = self.spec = FeatureSpec(**copy.deepcopy(asdict(spec)))
        config = spec.llama_config()
        self.config = config
        h = spec.hidden
        ids = spec.draft_ids or list(range(spec.vocab_size))
        self.embed_tokens = nn.Embedding(spec.vocab_size, h)
        self.fc = nn.Linear(len(spec.target_layers) * h, h, bias=False)
        self.layers = nn.ModuleList(FeatureLayer(config, i == 0, spec.norm_before_residual)
                                    for i in range(spec.decoder_layers))
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, len(ids), bias=False)
        self.rotary = LlamaRotaryEmbedding(config)
        self.register_buffer("draft_ids", torch.tensor(ids, dtype=torch.long), persistent=False)

    # The trainer and the reports treat every drafter alike through these.
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def save_pretrained(self, folder: str, state_dict: dict[str, torch.Tensor] | None = None, **_: Any) -> None:
        """vLLM's eagle3 folder (:func:`save_feature_drafter`), under the name the trainer's export calls."""
        save_feature_drafter(self, folder, state_dict)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's k hidden states, concatenated [..., k·H], as one [..., H]."""
        return self.fc(features.to(self.fc.weight.dtype))

    def rope(self, x: torch.Tensor, positions: torch.Tensor):
        return self.rotary(x, positions[None] if positions.dim() == 1 else positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary [..., V'] from the layers' output (before the norm)."""
        return self.lm_head(self.norm(hidden))

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode new positions after what `cache` holds (one (k, v) per layer, appended in place).

        hidden [1, n, H]: the fused target features, or the drafter's own outputs when chaining;
        tokens [1, n]: the next token at each position; positions [n]. Causal among the n, full
        over the cache. Returns (logits [1, n, V'], the layers' output [1, n, H] before the norm).
        The decoding step is the module's forward so that forward hooks (bench/spec_time_split.py's
        timer) see it; `fuse` stays outside, as the proposer fuses the target's features first.
        """
        emb = self.embed_tokens(tokens)
        cos, sin = self.rope(hidden, positions)
        n = hidden.shape[1]
        for i, layer in enumerate(self.layers):
            x, residual = layer.attention_input(hidden, emb)
            q, k, v = layer.kv(x, cos, sin)
            past = 0
            if cache is not None:
                if len(cache) > i:
                    past = cache[i][0].shape[2]
                    k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
                    cache[i] = (k, v)
                else:
                    cache.append((k, v))
            mask = torch.ones(n, past + n, dtype=torch.bool, device=hidden.device).tril(past)
            hidden = layer.finish(q, k, v, mask, residual)
        return self.logits(hidden), hidden

    def step(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
             cache: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: `forward`, called through the module so that its hooks run."""
        return self(hidden, tokens, positions, cache)


def ttt_mask(length: int, step: int, device: torch.device) -> torch.Tensor:
    """Which keys step j (1-based) of the training-time-test unroll reads: bool [T, j·T].

    Keys are laid out step by step (step 1's T positions, then step 2's, ...). The query of step j
    at position t drafts from the anchor a = t − j + 1 (the last position with target features):
    it reads step 1's keys at positions <= a, and step i's (2 <= i <= j) key at a + i − 1 only, the
    chain it would have built at inference.
    """
    t = torch.arange(length, device=device)
    blocks = [t[None, :] <= (t[:, None] - step + 1)]
    blocks += [t[None, :] == (t[:, None] - step + i) for i in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


def unrolled_logits(model: FeatureDrafter, features: torch.Tensor, input_ids: torch.Tensor,
                    steps: int) -> list[torch.Tensor]:
    """Training-time test: the drafter unrolled `steps` times over every position at once.

    features [B, T, k·H]: the target's hidden states at each position; input_ids [B, T]. Step j's
    output at position t [B, T, V'] is the j-th draft from anchor a = t − j + 1 (what it would see at
    inference: target features up to a, its own outputs after), and predicts token t + 2, which
    the target's distribution at position t + 1 scores. Positions t < j − 1 have no anchor; the
    caller masks them (and padding) out.
    """
    b, length, _ = features.shape
    positions = torch.arange(length, device=features.device)
    # x_{t+1} at t; the last position has no next token (its output is never scored)
    nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    emb = model.embed_tokens(nxt)
    hidden = model.fuse(features)
    cos, sin = model.rope(hidden, positions)
    keys: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in model.layers]
    out = []
    for j in range(1, steps + 1):
        if j > 1:  # the previous step's output at t − 1 stands in for the target's features at t
            hidden = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
        mask = ttt_mask(length, j, features.device)
        for i, layer in enumerate(model.layers):
            x, residual = layer.attention_input(hidden, emb)
            q, k, v = layer.kv(x, cos, sin)
            keys[i].append((k, v))
            k_all = torch.cat([kv[0] for kv in keys[i]], 2)
            v_all = torch.cat([kv[1] for kv in keys[i]], 2)
            hidden = layer.finish(q, k_all, v_all, mask, residual)
        out.append(model.logits(hidden))
    return out


def layer_fields(target_config: Any) -> dict[str, Any]:
    text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    fields = {k: getattr(text, k, None) for k in _LAYER_FIELDS}
    if fields["head_dim"] is None:
        fields["head_dim"] = text.hidden_size // text.num_attention_heads
    if isinstance(fields["eos_token_id"], list):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    # One rope for the one layer: a target that keeps one per attention type (Gemma 3: local and
    # global) gives its full-attention one, as the drafter's layer attends over the whole context.
    # vLLM reads either key, and a nested one breaks its rope lookup.
    rope = fields["rope_parameters"] or fields["rope_scaling"]
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        fields["rope_parameters"] = fields["rope_scaling"] = dict(rope["full_attention"])
    # The layer is a Llama layer, in vLLM too, whose MLP runs SiLU only: a target's other
    # activation (Gemma's tanh GELU) is not kept, and distillation trains the copied MLP to SiLU.
    fields["hidden_act"] = "silu"
    return fields


def feature_spec(target_config: Any, layers: list[int] | None = None, decoder_layers: int = 1,
                 norm_before_residual: bool = False, verifier: str = "") -> FeatureSpec:
    """The drafter's spec for a target's config; ValueError names a layer the target lacks."""
    config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    n = config.num_hidden_layers
    layers = list(layers) if layers is not None else default_layers(n)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ValueError(f"feature layers {layers}: list distinct layers of the target's 0..{n - 1}")
    layers = sorted(layers)  # vLLM concatenates the target's hidden states in ascending layer order
    return FeatureSpec(layer=layer_fields(config), target_layers=layers, decoder_layers=decoder_layers,
                       norm_before_residual=norm_before_residual, verifier=verifier,
                       verifier_architectures=list(getattr(target_config, "architectures", None) or ["LlamaForCausalLM"]))


def feature_parameters(spec: FeatureSpec) -> dict[str, int]:
    """{"parameters": all, "trained": all but the (frozen) embeddings}, counted on the meta device."""
    with torch.device("meta"):
        draft = FeatureDrafter(spec)
    total = sum(p.numel() for p in draft.parameters())
    return {"parameters": total, "trained": total - draft.embed_tokens.weight.numel()}


def feature_from_target(target: Any, spec: FeatureSpec) -> FeatureDrafter:
    """A feature drafter for `target` (a loaded causal LM), started from the target's own weights.

    The embeddings (frozen in training), final norm and head are the target's; the decoder layer
    is a copy of the target's last, reading the fused state only (its weights on the embedding
    half start at zero); fc starts as the identity on the highest layer read, so the start reads
    that layer's state through the target's last layer. Full vocabulary: distillation cuts the head.
    """
    draft = FeatureDrafter(spec).to(target.dtype)
    _copy_target_weights(draft, target, target.config.get_text_config().num_hidden_layers - 1)
    return draft.eval()


# Where the drafter's (Llama) layer takes each weight from in the target's layer. Llama's
# post_attention_layernorm is the norm before the MLP: Gemma calls that one pre_feedforward_layernorm
# (its own post_attention_layernorm norms the attention's output, which a Llama layer does not).
_SOURCES = {"hidden_norm.weight": ("input_layernorm.weight",),
            "post_attention_layernorm.weight": ("pre_feedforward_layernorm.weight", "post_attention_layernorm.weight")}


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    """The elementwise scale an RMS norm applies: its weight w for Llama's, 1 + w for Gemma's (stored
    as an offset), read off its output for a vector of ones (whose RMS is 1, up to its eps)."""
    weight = norm.weight
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)) or 0.0)
    ones = torch.ones(1, weight.shape[0], dtype=weight.dtype, device=weight.device)
    return (norm(ones)[0] * (1.0 + eps) ** 0.5).to(weight.dtype)


def _source_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A target decoder layer's weights by name, each norm's weight as the scale it applies."""
    weights = dict(layer.named_parameters())
    for name, module in layer.named_modules():
        if name and "norm" in name.split(".")[-1] and getattr(module, "weight", None) is not None \
                and module.weight.dim() == 1:
            weights[f"{name}.weight"] = _norm_scale(module)
    return weights


def _copy_target_weights(draft: FeatureDrafter, target: Any, source: int) -> None:
    h = draft.spec.hidden
    src = _source_weights(target.get_decoder().layers[source])
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        draft.lm_head.weight.copy_(target.get_output_embeddings().weight)
        draft.norm.weight.copy_(_norm_scale(target.get_decoder().norm))
        draft.fc.weight.zero_()
        draft.fc.weight[:, -h:].copy_(torch.eye(h))
        for layer in draft.layers:
            for name, p in layer.named_parameters():
                key = next((k for k in _SOURCES.get(name, (name,)) if k in src), None)
                if key is None:
                    continue
                w = src[key]
                if p.shape == w.shape:
                    p.copy_(w)
                elif layer.first and p.shape[1] == 2 * w.shape[1]:  # q/k/v: [embedding half | feature half]
                    p.zero_()
                    p[:, h:].copy_(w)


def restrict_head(draft: FeatureDrafter, ids: list[int]) -> None:
    """Cut the head to the draft vocabulary `ids` (target ids, ascending): its rows for them."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    full = draft.draft_ids
    if len(full) != draft.spec.vocab_size:
        raise ValueError("the head is already cut to a draft vocabulary")
    head = nn.Linear(draft.spec.hidden, len(ids), bias=False).to(draft.lm_head.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(draft.lm_head.weight[ids_t])
    draft.lm_head = head
    draft.draft_ids = ids_t.to(draft.draft_ids.device)
    draft.spec.draft_ids = [int(i) for i in ids]


def speculators_config(spec: FeatureSpec, draft_vocab_size: int) -> dict[str, Any]:
    """config.json as vLLM's eagle3 loader (the speculators format) reads it."""
    # num_aux_hidden_states: vLLM sizes fc's input by it (3 when absent)
    layer = {**{k: v for k, v in spec.layer.items() if v is not None}, "num_hidden_layers": spec.decoder_layers,
             "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
             "num_aux_hidden_states": len(spec.target_layers)}
    return {
        "architectures": [ARCHITECTURE],
        "speculators_model_type": FEATURE_FORMAT,
        "speculators_version": "0.1.0",
        "transformer_layer_config": layer,
        "draft_vocab_size": draft_vocab_size,
        "target_hidden_size": spec.hidden,
        "norm_before_residual": spec.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": list(spec.target_layers),
        "speculators_config": {
            "algorithm": FEATURE_FORMAT,
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": spec.verifier, "architectures": list(spec.verifier_architectures)},
        },
        # draftalign's own record, which vLLM ignores
        "draftalign": {"decoder_layers": spec.decoder_layers},
    }


def save_feature_drafter(draft: FeatureDrafter, folder: str | Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The drafter in vLLM's eagle3 format: config.json and model.safetensors (with d2t and t2d)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or draft.state_dict()).items()
             if not k.startswith("rotary.")}
    ids = draft.draft_ids.to("cpu")
    if len(ids) < draft.spec.vocab_size:  # vLLM has no d2t for a full-vocabulary head, and refuses one
        state["d2t"] = ids - torch.arange(len(ids))
    t2d = torch.zeros(draft.spec.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    state["t2d"] = t2d
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(speculators_config(draft.spec, len(ids)), indent=2) + "\n")
    (folder / "feature_spec.json").write_text(json.dumps(asdict(draft.spec)) + "\n")


def load_feature_spec(path: str | Path) -> FeatureSpec:
    return FeatureSpec(**json.loads((Path(path) / "feature_spec.json").read_text()))


def load_feature_drafter(path: str | Path, dtype: torch.dtype = torch.float32) -> FeatureDrafter:
    """A feature drafter saved by :func:`save_feature_drafter`."""
    from safetensors.torch import load_file

    folder = Path(path)
    spec = load_feature_spec(folder)
    state = load_file(str(folder / "model.safetensors"))
    d2t = state.pop("d2t", None)  # none: the head covers the whole vocabulary
    state.pop("t2d", None)
    spec.draft_ids = [] if d2t is None else (d2t + torch.arange(len(d2t))).tolist()
    draft = FeatureDrafter(spec)
    draft.load_state_dict(state, strict=False)
    missing = set(draft.state_dict()) - set(state) - {k for k in draft.state_dict() if k.startswith("rotary.")}
    if missing:
        raise ValueError(f"feature drafter {folder}: weights missing from model.safetensors: {sorted(missing)[:5]}")
    return draft.to(dtype).eval()
