"""Reading TOML with file/line errors, and writing the resolved config back as TOML.

The standard library reads TOML (``tomllib``) but cannot write it; :func:`dumps` covers what an
mmfl config holds: scalars, tables, inline tables with numeric keys and arrays of tables.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from mmfl.errors import ConfigFileError

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def load(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error raises ConfigFileError with the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{p}: cannot read config file ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{p}:{m.group(1)}:{m.group(2)}" if m else str(p)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e)) or "invalid TOML"
        raise ConfigFileError(f"{where}: malformed TOML: {msg}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (``3``, ``0.5``, ``true``, ``{1 = 0.5}``),
    otherwise the raw string (so ``sampler.name=fedfair`` needs no quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _key(k: Any) -> str:
    k = str(k)
    return k if _BARE.match(k) else '"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'


def scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {scalar(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dumps(doc: dict[str, Any], _prefix: str = "") -> str:
    """Serialise ``doc``: scalars first, then sub-tables ``[a.b]`` and arrays of tables ``[[a]]``.

    Dicts whose keys are all numeric (e.g. ``processors = {1 = 0.5}``) are written inline.
    """
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if (isinstance(v, dict) and not _inline(v)) or _is_table_array(v):
            tables.append((k, v))
        else:
            lines.append(f"{_key(k)} = {scalar(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{_prefix}{_key(k)}"
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + dumps(v, name + ".")
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + dumps(item, name + ".")
    return out


def _inline(d: dict) -> bool:
    return all(re.fullmatch(r"-?\d+(\.\d+)?", str(k)) for k in d) and bool(d)
