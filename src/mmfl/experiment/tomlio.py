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

from mmfl.errors import ConfigError, ConfigFileError

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")

#: Deepest nesting of tables and arrays a config may have (an mmfl config needs 5 levels:
#: ``tasks[0].partition.sample_ranges[0][0]``); deeper documents are refused before anything
#: recursive (a copy, a repr) walks them.
MAX_DEPTH = 20


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> tuple[int, str]:
    """(depth, path) of the deepest table/array inside ``value``, walked without recursion;
    the walk stops once ``limit`` is exceeded (``path``: dotted, of the first too-deep node)."""
    deepest, where = 0, ""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            items = [(f"{path}.{k}" if path else str(k), v) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(node)]
        else:
            continue
        if depth + 1 > deepest:
            deepest, where = depth + 1, path
        if deepest > limit:
            break
        stack.extend((v, depth + 1, k) for k, v in items)
    return deepest, where


#: Most parts a dotted key may have (tomllib needs memory quadratic in it: a key of 100,000
#: parts takes tens of GB); an mmfl config needs 5.
MAX_KEY_PARTS = 32
#: Largest config file read (an mmfl config is a few KB).
MAX_BYTES = 16 * 2**20
_KEY_DOT = re.compile(r"\.[ \t]*[A-Za-z_\"'-]")  # a dot between key parts, not in a number


def long_dotted_key(text: str) -> int:
    """The number (1-based) of the first line of ``text`` holding more than
    :data:`MAX_KEY_PARTS` dots between key-like words (a dotted key too long to parse safely),
    else 0. Linear in the text; it may also count dots inside strings or comments, which an
    mmfl config never has that many of on one line."""
    for i, line in enumerate(text.splitlines(), start=1):
        if line.count(".") > MAX_KEY_PARTS and len(_KEY_DOT.findall(line)) > MAX_KEY_PARTS:
            return i
    return 0


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def load(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error raises ConfigFileError with the line."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # bounded: a FIFO or /dev/zero must not fill memory
        if len(raw) > MAX_BYTES:
            raise ConfigFileError(f"{p}: not a config file (more than {MAX_BYTES} bytes)")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{p}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{p}: cannot read config file (not UTF-8 text: byte "
                              f"{e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigFileError(f"{p}: cannot read config file ({e.strerror or e})") from None
    line = long_dotted_key(text)
    if line:
        raise ConfigFileError(f"{p}:{line}: malformed TOML: a dotted key of more than "
                              f"{MAX_KEY_PARTS} parts")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{p}:{m.group(1)}:{m.group(2)}" if m else str(p)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e)) or "invalid TOML"
        raise ConfigFileError(f"{where}: malformed TOML: {msg}") from None
    except RecursionError:
        raise ConfigFileError(f"{p}: malformed TOML: arrays or tables nested too deeply "
                              f"(an mmfl config needs at most {MAX_DEPTH} levels)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigFileError(f"{p}: malformed TOML: {_short(str(e), 120)}") from None
    depth, where = nesting_depth(doc)
    if depth > MAX_DEPTH:
        raise ConfigFileError(f"{p}: tables or arrays nested more than {MAX_DEPTH} levels deep "
                              f"(at {_short(where)})")
    return doc


def parse_value(text: str, key: str = "--set") -> Any:
    """A ``--set`` value: TOML syntax when it parses (``3``, ``0.5``, ``true``, ``{1 = 0.5}``),
    otherwise the raw string (so ``sampler.name=fedfair`` needs no quotes).

    Raises ConfigError naming ``key`` for a value nested more than :data:`MAX_DEPTH` levels
    deep or an integer too long to convert."""
    if long_dotted_key(text):
        raise ConfigError(key, f"value holds a dotted key of more than {MAX_KEY_PARTS} parts",
                          show_got=False)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(key, f"value nested more than {MAX_DEPTH} levels deep",
                          show_got=False) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(key, f"unreadable value ({_short(str(e), 80)})", show_got=False) from None
    if nesting_depth(value)[0] > MAX_DEPTH:
        raise ConfigError(key, f"value nested more than {MAX_DEPTH} levels deep", show_got=False)
    return value


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
