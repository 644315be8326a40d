"""draftalign's vLLM plugin: the CPU backend's expand_batch_to_tokens, mended (workers/vllm_plugin.py)."""

import pytest
import torch

from draftalign.workers.vllm_plugin import expand_batch_to_tokens


def _brute(x: list, cu: list[int], replace_from, replace_to) -> list:
    out, start = [], 0
    for value, end in zip(x, cu, strict=True):
        out += [replace_to if value == replace_from else value] * (end - start)
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_repeats_each_requests_value_over_its_draft_tokens(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(7, generator=gen) * 5).to(dtype)
    x[2] = x[5] = 0  # greedy requests' temperature, replaced as vLLM asks
    cu = torch.cumsum(torch.randint(0, 4, (7,), generator=gen), 0).to(torch.int32)  # a request may draft nothing
    got = expand_batch_to_tokens(x, cu, int(cu[-1]), replace_from=0, replace_to=1)
    assert got.dtype == dtype
    assert got.tolist() == pytest.approx(_brute(x.tolist(), cu.tolist(), 0, 1))


_REGISTERED = """
from importlib.metadata import entry_points

import torch
from vllm.platforms import current_platform
from vllm.v1.sample import rejection_sampler

from draftalign.workers.vllm_plugin import PLUGIN_NAME

[ep] = [e for e in entry_points(group="vllm.general_plugins") if e.name == PLUGIN_NAME]
assert current_platform.is_cpu()
current_platform.register_triton_kernel_overrides()  # what vLLM's CPU worker does at start-up
ep.load()()
got = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.7, 1.0]), torch.tensor([3, 6], dtype=torch.int32),
                                               6, replace_from=rejection_sampler.GREEDY_TEMPERATURE, replace_to=1)
assert torch.allclose(got, torch.tensor([0.7] * 3 + [1.0] * 3)), got.tolist()
"""


def test_the_plugin_is_registered_for_vllm_and_mends_the_cpu_kernel():
    # In a process of its own, as in a vLLM worker: vLLM's kernel overrides scan every loaded
    # module, and a module another test loaded (numba's llvmlite, by vLLM's n-gram proposer)
    # holds an object that scan cannot read.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _REGISTERED], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
