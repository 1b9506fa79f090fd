"""The configuration reference (docs/config.md), generated from the models in agent.config.

``python -m agent.configdoc`` prints it; ``--write`` rewrites docs/config.md. A test checks
that the file in the repository equals the output, so the reference cannot go stale. The
sample written by ``tillsync init`` is built from the same ``sections()``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from agent.config import (
    AgentConfig,
    as_model,
    is_secret,
    list_item,
    union_members,
)

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"

_BASE_WORDS = {str: "string", int: "integer", float: "number", bool: "boolean",
               Path: "path", SecretStr: "secret"}
_BOUND_WORDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


@dataclass(frozen=True)
class FieldDoc:
    """One key of a table, as the docs and the sample config show it."""

    key: str
    type: str  # in plain words, with constraints
    default: str | None  # TOML literal; None when the key has no default
    required: bool
    description: str
    secret: bool
    example: str | None  # TOML literal of the first example, if the field has one


@dataclass(frozen=True)
class Section:
    """One TOML table (``[api]``) or array of tables (``[[sinks]]``, one per ``type``)."""

    path: str  # dotted: "api.terminals"
    array: bool
    model: type[BaseModel]
    fields: list[FieldDoc]  # nested tables excluded: they have their own section

    @property
    def header(self) -> str:
        """Return the TOML header line: ``[store]`` or ``[[sinks]]``."""
        return f"[[{self.path}]]" if self.array else f"[{self.path}]"

    @property
    def tags(self) -> tuple[str, ...]:
        """Return the ``type`` values this section stands for (empty if untyped)."""
        if "type" not in self.model.model_fields:
            return ()
        return get_args(self.model.model_fields["type"].annotation)

    @property
    def summary(self) -> str:
        """Return the first line of the model's docstring."""
        return (self.model.__doc__ or "").strip().splitlines()[0]


def sections(model: type[BaseModel] = AgentConfig, prefix: str = "") -> Iterator[Section]:
    """Yield every table of the config tree, depth first, in field order."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        for child, array in _tables(info.annotation):
            rows = [_field_doc(key, field) for key, field in child.model_fields.items()
                    if not list(_tables(field.annotation))]
            yield Section(path, array, child, rows)
            yield from sections(child, f"{path}.")


def _tables(annotation: Any) -> Iterator[tuple[type[BaseModel], bool]]:
    """Yield the models a field holds as tables, and whether as an array of tables."""
    item = list_item(annotation)
    array = item is not None
    target = item if array else annotation
    members = union_members(target)
    if members:
        yield from ((m, array) for m in dict.fromkeys(members.values()))
    elif (model := as_model(target)) is not None:
        yield model, array


def _field_doc(key: str, info: FieldInfo) -> FieldDoc:
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    examples = info.examples or []
    return FieldDoc(
        key=key, type=type_words(info.annotation, info.metadata),
        default=None if default is None else toml_value(default), required=required,
        description=info.description or "", secret=is_secret(info.annotation),
        example=toml_value(examples[0]) if examples else None)


def type_words(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """Describe an annotation in words: ``integer, ≥ 1, ≤ 64``; ``list of string``."""
    metadata = list(metadata)
    while True:
        if get_origin(annotation) is Annotated:
            metadata += get_args(annotation)[1:]
            annotation = get_args(annotation)[0]
            continue
        others = [a for a in get_args(annotation) if a is not type(None)]
        if type(None) in get_args(annotation) and len(others) == 1:
            annotation = others[0]
            continue
        break
    if get_origin(annotation) is Literal:
        words = " | ".join(toml_value(value) for value in get_args(annotation))
    elif get_origin(annotation) is list:
        words = f"list of {type_words(get_args(annotation)[0])}"
    else:
        words = _BASE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return ", ".join([words, *_constraints(metadata)])


def _constraints(metadata: Sequence[Any]) -> Iterator[str]:
    for meta in metadata:
        if isinstance(meta, FieldInfo):  # Annotated[str, Field(...)] inside a list
            yield from _constraints(meta.metadata)
            continue
        for attr, sign in _BOUND_WORDS.items():
            bound = getattr(meta, attr, None)
            if bound is not None:
                yield f"{sign} {toml_value(bound)}"
        pattern = getattr(meta, "pattern", None)
        if pattern:
            yield f"matching `{pattern.removeprefix('^').removesuffix('$')}`"


def toml_value(value: Any) -> str:
    """Render a default or example as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return toml_string(str(value))


def toml_string(text: str) -> str:
    """Quote ``text`` as a TOML basic string."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------- the Markdown page

_INTRO = """\
# Configuration reference

<!-- Generated from agent/config.py by `python -m agent.configdoc --write`.
     Edit the models' descriptions there, not this file: a test compares the two. -->

tillsync reads one TOML file: the path given with `--config`, else `$TILLSYNC_CONFIG`, else
`/etc/tillsync/agent.toml` on Linux and `%ProgramData%\\tillsync\\agent.toml` on Windows.
`tillsync init` writes a commented starting point with fresh tokens and a new outbox key;
`tillsync check` validates a file without starting the agent.

## Rules

- **Unknown keys are errors**, so a misspelt key never silently falls back to its default.
  Every error names the key's dotted path and the bad value, one line per problem; a
  secret's value is never shown (`'***'`), nor that of an unknown key whose name looks like
  a secret's (`tokn`: `(value hidden)`):

  ```
  agent.toml: api.listne: unknown key (did you mean 'listen'?) (got '127.0.0.1:8765')
  agent.toml: sinks[0].concurrency: must be at least 1 (got 0)
  ```
- **Relative paths** (`outbox.path`, `outbox.key_file`, `ca_bundle`) are taken relative to
  the directory of the config file, not the working directory.
- Durations are in seconds (`_s`) or days (`_days`) and may be fractional.
- `${NAME}` is expanded only in secret keys (below), nowhere else.

## Minimal file

```toml
[store]
id = "store-042"

[api]
listen = "127.0.0.1:8765"
status_token_file = "status_token"

[[api.terminals]]
id = "T01"
# sha256 of the terminal's token (printf %s TOKEN | sha256sum), so this file holds no secret
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

[outbox]
path = "/var/lib/tillsync/outbox.db"
key_file = "/etc/tillsync/outbox.key"

[[sinks]]
name = "cloud"
type = "webhook"
url = "https://api.example.com/pos/events"
token = "${TILLSYNC_CLOUD_TOKEN}"
```
"""

_SECRET_FORMS = (
    ("inline", '`status_token = "s3cr3t"`',
     "The config file must then be readable by the service user only (`tillsync init` "
     "writes it with mode 0600)."),
    ("environment", '`status_token = "${TILLSYNC_STATUS_TOKEN}"`',
     "The whole value must be exactly `${NAME}`. An unset variable is an error."),
    ("file", '`status_token_file = "status_token"`',
     "The file's content, trailing newline removed. A relative path is looked up first in "
     "`$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), then next to the config file."),
)


def _render_secrets(all_sections: Sequence[Section]) -> str:
    where = ", ".join(f"`{f.key}` in `{s.header}`" for s in all_sections for f in s.fields
                      if f.secret)
    lines = ["## Secrets", "", f"Keys of type *secret* ({where}) can be given in three ways:",
             "", "| form | example | notes |", "|---|---|---|"]
    lines += [f"| {form} | {example} | {notes} |" for form, example, notes in _SECRET_FORMS]
    lines += ["", "Giving both `x` and `x_file` is an error, and so is an empty secret.", ""]
    return "\n".join(lines)


def render_reference() -> str:
    """Render the configuration reference as Markdown."""
    all_sections = list(sections())
    parts = [_INTRO, _render_secrets(all_sections)]
    parts += [_render_section(section) for section in all_sections]
    return "\n".join(parts)


def _render_section(section: Section) -> str:
    title = f"## `{section.header}`"
    if section.tags:
        title += " with " + " or ".join(f"`type = {toml_value(tag)}`" for tag in section.tags)
    lines = [title, "", section.summary, "", "| key | type | default | description |",
             "|---|---|---|---|"]
    for f in section.fields:
        default = "required" if f.required else "not set" if f.default is None else \
            f"`{f.default}`"
        description = f.description
        if f.secret:
            description += f" Also as `{f.key}_file` or `\"${{ENV_VAR}}\"` (see Secrets)."
        cells = [f"`{f.key}`", f.type, default, description]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    # A pipe ends a Markdown table cell even inside backticks.
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or write it to docs/config.md with ``--write``."""
    parser = argparse.ArgumentParser(prog="python -m agent.configdoc",
                                     description="Generate the configuration reference.")
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    args = parser.parse_args(argv)
    text = render_reference()
    if args.write:
        DOC_PATH.write_text(text, encoding="utf-8", newline="\n")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
