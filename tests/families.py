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


def model_config(family: Family, vocab_size: int, bos: int, eos: int, pad: int | None = None, **overrides: Any):
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
    config = model_config(family, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path))
    # The folder's tokenizer, as every stage loads it (the config now names the family), fits the model.
    assert len(AutoTokenizer.from_pretrained(str(path))) == config.vocab_size, name
    return path


def sharpen(path: Path) -> None:
    """Scale the target's output layer by 8: greedy choices then are not near-ties that float32
    rounding could flip between one forward and a k-token verify (tied heads scale the table too)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(str(path))


# ---- the pipeline on each family, in one process (one Ray session) ---------------------------------

RAY_FAMILIES = ("llama", "qwen3", "mistral", "gemma3")  # with vLLM (heavy): 3 to 7.5 minutes each here
# Without vLLM, in `make test` (1 to 2.5 minutes each here): the same four families through the
# target pool's distillation and the reference engine's lossless evaluation.
SLOW_FAMILIES = RAY_FAMILIES
BASE = {
    "run": {"name": "family", "seed": 0},
    "ray": {"num_cpus": 3, "include_dashboard": False},
    "pretrain": {"jobs": {"draft": {"arch": {"target_layers": [0, 1]}, "train": None},
                          "feature": {"arch": {"feature": {}}, "train": None}}},
    "generate": {"fields": {"instruction": "instruction", "input": "input", "id": "id"}, "max_seeds": 4,
                 "self_instruct": {"count": 3, "temperature": 1.0, "max_tokens": 16},
                 "sampling": [{"name": "greedy", "temperature": 0.0, "top_p": 1.0, "max_tokens": 12}],
                 "engine": {"replicas": 1, "batch_size": 8, "cpus_per_replica": 0.5, "max_model_len": 512,
                            "env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}},
    "distill": {"losses": [{"name": "forward_kl"}, {"name": "forward_kl", "drafter_kind": "feature"}],
                "holdout_fraction": 0.25, "optim": {"lr": 1.0e-3, "warmup_steps": 1},
                "train": {"num_workers": 1, "cpus_per_worker": 1, "seq_len": 48, "micro_batch_size": 4,
                          "max_steps": 2, "checkpoint_every": 2, "log_every": 1, "eval_batches": 1},
                "target_pool": {"actors": 1, "cpus_per_actor": 0.5, "prefetch": 2}},
    "evaluate": {"tasks": [{"name": "open_ended", "kind": "open_ended"}], "engines": ["reference"], "gammas": [2],
                 "temperatures": [0.0], "max_prompts": 2, "max_new_tokens": 8, "ngram": None,
                 "vllm": {"cpus_per_engine": 1, "max_model_len": 512}},
}


def run_config(root: Path, name: str, heavy: bool) -> Path:
    """The config of `name`'s run under root/name: a hand-made set, or (heavy) vLLM's answers."""
    import copy

    import yaml

    from draftalign.models.arch import load_model_config
    from draftalign.models.support import vllm_refusal

    world = root / name / "target"
    cfg = copy.deepcopy(BASE)
    cfg["run"]["output"] = str(root / name / "run")
    cfg["models"] = {"target": str(world)}
    cfg["tokenizer"] = {"source": str(world)}
    cfg["generate"]["seeds"] = str(Path(__file__).resolve().parent.parent / "examples" / "data" / "seeds.jsonl")
    if heavy:
        served = vllm_refusal(load_model_config(str(world)), feature=True) is None
        cfg["evaluate"]["engines"] = ["reference", "vllm"] if served else ["reference"]
    else:  # one Ray Train job (the cut); the feature drafter's start is evaluated beside it
        run = root / name / "run"
        cfg["distill"]["data"] = str(root / name / "set")
        cfg["distill"]["losses"] = [{"name": "forward_kl"}]
        cfg["evaluate"]["drafters"] = [{"name": "start", "path": str(run / "pretrain" / "draft" / "model")},
                                       {"name": "forward_kl", "path": str(run / "distill" / "forward_kl" / "model")},
                                       {"name": "feature-start", "path": str(run / "pretrain" / "feature" / "model")}]
    path = root / name / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stage(result: dict, stage: str, config: Path) -> bool:
    """Run one stage through the Python API; record its time, or its error and stop the family."""
    import time
    import traceback

    from draftalign.api import run_stage

    start = time.time()
    try:
        run_stage(stage, config)
    except Exception as exc:  # the test reports which family and stage failed, and why
        result["error"] = {"stage": stage, "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()[-4000:]}
        print(f"[families] {config.parent.name} {stage} failed: {result['error']['traceback']}", flush=True)
        return False
    result["seconds"][stage] = round(time.time() - start, 1)
    return True


def run_family(root: Path, name: str, heavy: bool) -> dict:
    """Build `name`'s world and run pretrain, (heavy: generate,) distill and evaluate on it."""
    from tests.worlds import distill_set

    world = build_family(name, root / name / "target")
    sharpen(world)
    if not heavy:
        distill_set(root / name / "set", 12, target=world)
    config = run_config(root, name, heavy)
    result: dict = {"family": name, "seconds": {}}
    stages = ["pretrain", "generate", "distill", "evaluate"] if heavy else ["pretrain", "distill", "evaluate"]
    all(_stage(result, stage, config) for stage in stages)
    return result


def main(root: str, heavy: str, *names: str) -> None:
    """Run the families in this one process (one Ray session) and write root/results.json."""
    import json

    import ray

    out = Path(root)
    results = {name: run_family(out, name, heavy == "heavy") for name in names}
    if ray.is_initialized():
        ray.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # vLLM's spawned workers import this file again: run nothing then
    import sys

    main(*sys.argv[1:])
