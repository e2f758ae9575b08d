"""mkdocs hooks (mkdocs.yml `hooks:`): pages generated at build time, so none of them can go stale.

* `reference/config.md`: every config key with its type, default and one-line doc, walked from the
  pydantic models in `tracerl.config` and each environment's typed `env.options` model;
* `overview.md`: docs/README.md (the method notes' index and vocabulary; as README.md mkdocs would make
  it a second home page, so mkdocs.yml excludes it and it is served under this name);
* `benchmarks.md`: BENCHMARKS.md from the repository root, the current figures with their commands.

    python scripts/mkdocs_hooks.py        # print the config reference
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))  # document this checkout's code, not an installed copy

from pydantic import BaseModel  # noqa: E402

_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def type_name(ann: Any) -> str:
    """A field annotation in words: `int`, `'a' or 'b'`, `float or null`, `list[int]`."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


def bounds(field: Any) -> str:
    """A field's numeric and length constraints, e.g. `≥ 1`, `> 0, ≤ 1`."""
    out = []
    for m in field.metadata:
        for attr, sign in _BOUNDS:
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "min_length", None) is not None:
            out.append(f"length ≥ {m.min_length}")
    return ", ".join(out)


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = type_name(field.annotation) + (f" ({bounds(field)})" if bounds(field) else "")
        rows.append(f"| `{prefix}{name}` | {_cell(kind)} | `{_cell(_default(field))}` | {_cell(field.description or '')} |")
    return rows


def config_reference() -> str:
    """The configuration reference page (Markdown)."""
    from tracerl.config import Config
    from tracerl.envs import ENVIRONMENTS, options_model

    out = ["# Configuration reference", "",
           "Generated from the typed schema (`src/tracerl/config.py` and each environment's options model) "
           "when the site is built. Every key can be set in a YAML file (`--config FILE`) or on the command "
           "line as `section.key=value`; `tracerl train --help-config` prints the same list. Unknown keys and "
           "wrong types stop with one line naming the key ([bad input](../bad_input.md)).", ""]
    for name, field in Config.model_fields.items():
        section = field.annotation
        out += [f"## `{name}`", "", field.description or ""]
        if section.__dict__.get("__doc__"):  # the section's own docstring, not one inherited
            out += ["", " ".join(section.__doc__.split())]
        out += [""] + _table(section, f"{name}.") + [""]
    out += ["## `env.options` per environment", "",
            "`env.options` is checked against the typed options the environment named by `env.name` registers "
            "(`ENVIRONMENTS.register(name, options=...)`), before anything is built.", ""]
    for env in ENVIRONMENTS.names():
        model = options_model(env)
        if model is None:
            continue
        out += [f"### `env.name={env}`", ""]
        if model.__doc__:
            out += [" ".join(model.__doc__.split()), ""]
        out += _table(model, "env.options.") + [""]
    return "\n".join(out)


def benchmarks_page() -> str:
    """BENCHMARKS.md with its repository-relative links made relative to the site's docs."""
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, content in (("reference/config.md", config_reference()),
                         ("overview.md", (REPO / "docs" / "README.md").read_text(encoding="utf-8")),
                         ("benchmarks.md", benchmarks_page())):
        files.append(File.generated(config, uri, content=content))
    return files


if __name__ == "__main__":
    print(config_reference())
