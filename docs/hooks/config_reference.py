"""The config reference page (reference/config.md), generated from draftalign/config.py.

An MkDocs hook (`hooks:` in mkdocs.yml): every `mkdocs build` or `mkdocs serve` renders the page
again from the pydantic models of `draftalign.config` (field names, types, defaults, bounds,
class docstrings) and the `#` comments on or just above each field in config.py's source, so the
page cannot fall behind the code. A field's `Field(description=...)` wins over its comment.
`draftalign.config` imports only pydantic and yaml: no Ray or torch is needed to build the docs.

Run as a script, it prints the page: `python docs/hooks/config_reference.py`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIG_PY = REPO / "draftalign" / "config.py"
PAGE = "reference/config.md"


def _load_module() -> types.ModuleType:
    """draftalign.config from this checkout, read anew (mkdocs serve rebuilds after an edit)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    name = "draftalign.config"
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


def _comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment text on the field's line and on the comment lines just above."""
    comment_at: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comment_at[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above: list[str] = []
            n = item.lineno - 1  # the line above, 1-based
            while n >= 1 and lines[n - 1].strip().startswith("#") and n in comment_at:
                above.insert(0, comment_at[n])
                n -= 1
            trailing = [comment_at[n] for n in range(item.lineno, (item.end_lineno or item.lineno) + 1)
                        if n in comment_at and not lines[n - 1].strip().startswith("#")]
            text = " ".join(above + trailing).strip()
            if text:
                out[(node.name, item.target.id)] = text
    return out


def _annotations(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the annotation as written in config.py (`int | None`, `list[Gamma]`)."""
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out[(node.name, item.target.id)] = ast.unparse(item.annotation)
    return out


def _aliases(source: str) -> dict[str, str]:
    """Module-level type aliases (`Gamma = Annotated[int, Field(ge=1)]`), as written."""
    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Subscript) and ast.unparse(node.value.value) == "Annotated"):
            out[node.targets[0].id] = ast.unparse(node.value)
    return out


def _models_in(annotation: Any, base: type) -> list[tuple[str, type]]:
    """The pydantic models inside a field's type, each with the path step that reaches it:
    "" (the field itself), "[i]" (a list entry) or ".<key>" (a mapping's value)."""
    found: list[tuple[str, type]] = []

    def walk(tp: Any, step: str) -> None:
        if isinstance(tp, type) and issubclass(tp, base):
            found.append((step, tp))
            return
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            walk(args[0], step)
        elif origin in (list, tuple, set, frozenset):
            for a in args:
                walk(a, step + "[i]")
        elif origin is dict:
            key = args[0] if args else Any
            keys = typing.get_args(key) if typing.get_origin(key) is typing.Literal else ()
            walk(args[1], step + (".{" + ",".join(map(str, keys)) + "}" if keys else ".<name>"))
        else:
            for a in args:  # unions, Optional
                walk(a, step)

    walk(annotation, "")
    return found


def _yaml(value: Any) -> str:
    """A default as one line of YAML-ish JSON."""
    return json.dumps(value, ensure_ascii=False)


def _default(field: Any, base: type) -> tuple[str, Any]:
    """The rendered default and the default object itself (None when required)."""
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required", None
    else:
        value = field.default
    if isinstance(value, base):
        return "", value
    if isinstance(value, list) and value and all(isinstance(v, base) for v in value):
        return _yaml([v.model_dump(mode="json") for v in value]), value
    if isinstance(value, tuple):
        value = list(value)
    return _yaml(value), value


def _changed(value: Any) -> dict[str, Any]:
    """The fields of a default model instance that differ from its class's own defaults."""
    try:
        plain = type(value)()
    except Exception:  # a model with required fields: show every field
        return value.model_dump(mode="json")
    return {k: v for k, v in value.model_dump(mode="json").items() if v != plain.model_dump(mode="json")[k]}


def _bounds(field: Any) -> str:
    """A field's numeric and length bounds, e.g. `≥ 1`, `> 0, ≤ 1`, `pattern ^[a-z]+$`."""
    parts: list[str] = []
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤"}
    for meta in field.metadata:
        for attr, sign in signs.items():
            v = getattr(meta, attr, None)
            if v is not None:
                parts.append(f"{sign} {v}")
        pattern = getattr(meta, "pattern", None)
        if pattern is not None:
            parts.append(f"pattern `{pattern}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    """Comment text for a table cell: outside code spans, pipes escaped and `<`, `>`, `&` kept literal."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(parts)


def _code(text: str) -> str:
    # Python-Markdown's tables do not split cells at a pipe inside a code span: no escape there.
    return "`" + text + "`" if text else ""


def _anchor(path: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in path.lower()).strip("-").replace("--", "-")


def render() -> str:
    """The page's Markdown."""
    mod = _load_module()
    base = mod.BaseModel
    source = CONFIG_PY.read_text(encoding="utf-8")
    comments = _comments(source)
    annotations = _annotations(source)
    aliases = _aliases(source)

    # The sections: every model class once, in tree order (depth first from Config), with every
    # path that reaches it.
    paths: dict[type, list[str]] = {}
    order: list[type] = []

    def visit(cls: type, path: str) -> None:
        if cls in paths:
            paths[cls].append(path)
            return
        paths[cls] = [path]
        order.append(cls)
        for name, field in cls.model_fields.items():
            for step, sub in _models_in(field.annotation, base):
                visit(sub, f"{path}.{name}{step}" if path else f"{name}{step}")

    visit(mod.Config, "")

    out = [
        "# Config reference",
        "",
        "<!-- Generated by docs/hooks/config_reference.py from draftalign/config.py at every",
        "     `mkdocs build`: edit the field comments there, not this page. -->",
        "",
        "Every key of the config tree, generated from `draftalign/config.py` (the pydantic models, their",
        "docstrings and the comments on their fields). A config file sets any of them in YAML, and",
        "`draftalign STAGE CONFIG a.b=value` overrides one by its dotted path (see",
        "[Configs and the command line](../usage.md)). Every model rejects unknown keys and NaN or",
        "infinite numbers. `[i]` stands for an entry of a list (`evaluate.gammas.1` in an override),",
        "`{a,b}` for the keys a mapping allows. A section used at several places lists them all;",
        "a default that differs from the section's own is given where it is used.",
        "",
    ]
    if aliases:
        out += ["Types named in the tables: " + "; ".join(f"`{k}` = `{v}`" for k, v in aliases.items()) + ".", ""]

    for cls in order:
        where = paths[cls]
        title = where[0] or "Config"
        out.append(f"## `{title}` {{#{_anchor(title) or 'config'}}}")
        out.append("")
        out.append(f"*{cls.__name__}*" + (": also at " + ", ".join(f"`{p}`" for p in where[1:]) if len(where) > 1 else ""))
        out.append("")
        doc = cls.__dict__.get("__doc__")
        if doc:
            out += [inspect.cleandoc(doc), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            rendered, value = _default(field, base)
            subs = _models_in(field.annotation, base)
            text = field.description or comments.get((cls.__name__, name), "")
            bounds = _bounds(field)
            if bounds:
                text = (text + " " if text else "") + f"({bounds})"
            links = []
            for _step, sub in subs:
                target = paths[sub][0] or "Config"
                links.append(f"[`{target}`](#{_anchor(target)})")
            if links:
                text = (text + " " if text else "") + "See " + ", ".join(links) + "."
            default = _code(rendered) if rendered != "required" else "required"
            if rendered == "required" and subs and not typing.get_args(field.annotation):
                # a stage section: Config fills its `output` from run.output, the rest defaults
                default = "its section's"
            if isinstance(value, base):
                changed = _changed(value)
                default = "its section's" + (f", with {_code(_yaml(changed))}" if changed else "")
            key = f"{where[0]}.{name}" if where[0] else name
            type_text = annotations.get((cls.__name__, name), str(field.annotation))
            out.append(f"| `{key}` | {_code(type_text)} | {default} | {_cell(text)} |")
        out.append("")
    return "\n".join(out)


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated page to the site's files (nothing is written under docs/)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    sys.stdout.write(render())
