"""docs/config.md, the config reference, generated from the pydantic model itself: every key
with its type, its default and what it means (the comments beside the field in
rlaif_ray/config.py). tests/test_config_doc.py fails when the file is stale.

    python -m rlaif_ray.run.config_doc --write     # regenerate docs/config.md
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from rlaif_ray import config

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def field_comments(module) -> dict[tuple[str, str], str]:
    """{(class name, field name): its comment}: the comment lines right above the field and
    the one at the end of its line, joined."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT
                and lines[tok.start[0] - 1].split("#")[0].strip()}
    out = {}
    for cls in (n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            parts = above + ([trailing[node.lineno]] if node.lineno in trailing else [])
            out[(cls.name, node.target.id)] = " ".join(p for p in parts if p)
    return out


def type_name(annotation) -> str:
    """A field's type as a reader writes it: `int`, `float`, `auto | int`, `one of: hf, vllm`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args if a is not type(None)) + \
            (" or null" if type(None) in args else "")
    if origin is dict:
        return f"map of {type_name(args[0])} to {type_name(args[1])}"
    if origin is list:
        return f"list of {type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def rows(defaults: BaseModel, prefix: str, comments: dict) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every leaf field of a section, given its default
    value (a section's defaults can differ from its class's: pipeline.generators), in order."""
    out, model = [], type(defaults)
    for name, f in model.model_fields.items():
        default = getattr(defaults, name)
        if isinstance(default, BaseModel):
            out += rows(default, f"{prefix}{name}.", comments)
            continue
        shown = json.dumps(default) if not isinstance(default, str) else default
        out.append((f"{prefix}{name}", type_name(f.annotation), shown, comments.get((model.__name__, name), "")))
        section = optional_section(f.annotation)
        if default is None and section is not None:  # an optional section (model.lora): its keys when given
            out += rows(section(), f"{prefix}{name}.", comments)
    return out


def optional_section(annotation):
    """The section class of an `Optional[Section]` field (None for any other field)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    found = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return found[0] if len(found) == 1 and type(None) in args else None


def render() -> str:
    comments = field_comments(config)
    lines = ["# Configuration reference", "",
             "Generated from `rlaif_ray/config.py` by `python -m rlaif_ray.run.config_doc --write`; do not edit by "
             "hand (`tests/test_config_doc.py` fails when it is stale). A config is YAML with these sections; every "
             "key is optional, unknown keys are refused, and `--set KEY=VALUE` overrides one on the command line. "
             "`auto` values that depend on the machine are resolved at start-up and recorded in the run's "
             "config.yaml (`rlaif_ray/run/resolve.py`).", ""]
    defaults = config.Config()
    for name in config.Config.model_fields:
        section = getattr(defaults, name)
        doc = " ".join((type(section).__doc__ or "").split())
        lines += [f"## `{name}`", ""] + ([doc, ""] if doc else [])
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, kind, default, meaning in rows(section, f"{name}.", comments):
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append(f"| `{key}` | {cell(kind)} | `{cell(default)}` | {cell(meaning)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--write" in sys.argv[1:]:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        print(text)
