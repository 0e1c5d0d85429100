"""The panel file's reference, written from the pydantic models themselves: every section, field,
type, default and description, so the documentation cannot drift from what `load_panel` accepts.
Pure; the docs site's build hook (docs/hooks/panel_reference.py) puts it into the panel page."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from poll_assets.code_versions import JUDGING_EXCLUDED_FOR_JUDGES, MEMBER_EXCLUDED, SOURCE_EXCLUDED
from poll_assets.panel import Panel

_CONSTRAINTS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "at least"), ("max_length", "at most"))
# The settings models whose fields make a stage's code version: which stage, and the fields left out.
_NOT_IN_VERSION = {"Member": ("the member's own assets", MEMBER_EXCLUDED),
                   "Source": ("`prompts`", SOURCE_EXCLUDED),
                   "Judging": ("every judge's `ratings/<judge>`", JUDGING_EXCLUDED_FOR_JUDGES)}


def panel_models(root: type[BaseModel] = Panel) -> dict[type[BaseModel], list[str]]:
    """Every model of the panel file, root first, depth first, with the YAML paths where it is used
    (a model used twice, as Member for generators and judges, is one section)."""
    paths: dict[type[BaseModel], list[str]] = {}

    def walk(path: str, model: type[BaseModel]) -> None:
        if model in paths:
            paths[model].append(path)
            return
        paths[model] = [path]
        for name, info in model.model_fields.items():
            for inner, suffix in _models_in(info.annotation):
                walk(f"{path}.{name}{suffix}".lstrip("."), inner)

    walk("", root)
    return paths


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The models an annotation holds, each with how it is reached: '' (itself), '[]' (a list item), '.<key>' (a dict value)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [(m, "[]" + s) for m, s in _models_in(args[0])]
    if origin is dict:
        return [(m, ".<key>" + s) for m, s in _models_in(args[1])]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _models_in(arg)]
    return []


def type_name(annotation: Any) -> str:
    """A field's type as a reader of the YAML file thinks of it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map {type_name(args[0])} → {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return {str: "text", int: "integer", float: "number", bool: "true/false"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(info: FieldInfo) -> str:
    bounds = []
    for meta in info.metadata:
        for attr, sign in _CONSTRAINTS:
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""


def default_text(info: FieldInfo) -> str:
    """The default as it would be written in the YAML file (true, null, "text", [])."""
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return "see the section" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    if info.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(info.default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def model_section(paths: list[str], model: type[BaseModel]) -> str:
    """One model's heading, docstring and table of fields."""
    where = ", ".join(f"`{p}`" for p in paths if p) or "the top level of the file"
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"## {model.__name__}", "", f"In the panel file: {where}." + (f" {doc}" if doc else ""), ""]
    if model.__name__ in _NOT_IN_VERSION:
        stage, excluded = _NOT_IN_VERSION[model.__name__]
        lines += [f"Every field is part of the code version of {stage}, so changing one marks those partitions "
                  "stale, except (`poll_assets/code_versions.py`):", ""]
        lines += [f"- `{name}`: {why}" for name, why in excluded.items()] + [""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        lines.append(f"| `{name}` | {_cell(type_name(info.annotation))}{_cell(_constraints(info))} | "
                     f"{_cell(default_text(info))} | {_cell(info.description or '')} |")
    return "\n".join(lines)


def panel_reference_markdown() -> str:
    """Every section of the panel file, as Markdown: one heading and one table per model."""
    return "\n\n".join(model_section(paths, model) for model, paths in panel_models().items()) + "\n"
