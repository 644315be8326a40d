"""The manual: the strict MkDocs build (no broken link or anchor), the README's size and links, and
the generated config reference (every key, without Ray or torch)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 250


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    config_page = site / "reference" / "config" / "index.html"
    assert config_page.is_file()
    html = config_page.read_text(encoding="utf-8")
    for key in ("run.output", "generate.engine.cpus_per_replica", "distill.target_pool.top_k",
                "evaluate.vllm.speculative_config", "tracking.backend"):
        assert f"<code>{key}</code>" in html, key
    assert not (REPO / "docs" / "reference" / "config.md").exists(), \
        "docs/reference/config.md is generated at build time; do not commit one"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the rest into docs/")


def _readme_links() -> list[str]:
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # code blocks hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchors(md: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    out = set()
    fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if m:
            explicit = re.search(r"\{#([^}\s]+)\}\s*$", m.group(1))
            title = re.sub(r"`", "", m.group(1))
            out.add(explicit.group(1) if explicit else slugify(title, "-"))
    return out


def test_readme_relative_links_exist() -> None:
    links = [u for u in _readme_links() if not re.match(r"[a-z][a-z0-9+.-]*:", u)]
    assert links, "the README links to the manual"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (REPO / path) if path else README
        assert target.exists(), f"README.md links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"README.md links to {link}: no such heading"


def test_config_reference_is_complete_without_ray_or_torch() -> None:
    """Every key of the config tree is in the generated page; rendering imports neither Ray nor torch."""
    code = (
        "import sys, runpy\n"
        "mod = runpy.run_path('docs/hooks/config_reference.py', run_name='config_reference')\n"
        "page = mod['render']()\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "sys.stdout.write(page)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout

    from pydantic import BaseModel

    from draftalign.config import Config

    def keys(model: type[BaseModel], seen: set[type]) -> set[str]:
        """Every field name of every model in the tree (paths differ by list/mapping notation)."""
        if model in seen:
            return set()
        seen.add(model)
        found = {f"{model.__name__}.{name}" for name in model.model_fields}
        for field in model.model_fields.values():
            for sub in re.findall(r"\b([A-Z]\w+)\b", str(field.annotation)):
                cls = getattr(sys.modules["draftalign.config"], sub, None)
                if isinstance(cls, type) and issubclass(cls, BaseModel):
                    found |= keys(cls, seen)
        return found

    missing = []
    for key in sorted(keys(Config, set())):
        cls_name, field = key.split(".")
        if not re.search(rf"\| `[^`]*\b{re.escape(field)}` \|", page):
            missing.append(key)
    assert not missing, f"config keys missing from the reference: {missing}"
    sections = re.findall(r"^## `([^`]+)`", page, flags=re.M)
    assert sections[:5] == ["Config", "run", "ray", "tokenizer", "models"], sections
    assert len(sections) == len(set(sections)), "a config class documented twice"

