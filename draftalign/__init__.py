"""draftalign: train draft models for speculative decoding.

The Python API (`draftalign.api`) is importable from here: `load_config`, `run_stage`,
`plan_stage`, `StageResult`. They load lazily, so `import draftalign` imports neither torch
nor Ray nor pydantic.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["StageResult", "load_config", "plan_stage", "run_stage"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from draftalign import api

        return getattr(api, name)
    raise AttributeError(f"module 'draftalign' has no attribute {name!r}")
