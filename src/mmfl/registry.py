"""One registry for every pluggable component: datasets, models, samplers, aggregators, engines.

Register from user code without editing mmfl::

    import mmfl

    @mmfl.register("dataset", "my_data", options={"size": mmfl.Option(int, 1000, "> 0", ...)})
    def load_my_data(options, data_dir): ...

Built-in components live in modules that are imported lazily the first time a kind is looked up,
so importing :mod:`mmfl.registry` (or :mod:`mmfl.core`) never imports torch.

Each entry may declare ``options``: a mapping of option name to :class:`Option`. The config layer
validates a component's option table against it (unknown keys, types, ranges) and fills defaults.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from mmfl.errors import ConfigError

KINDS = ("dataset", "model", "sampler", "aggregator", "engine")

#: The range of every integer option (int64; tighter rules give a sane range per option).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

_BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "dataset": ("mmfl.tasks.datasets", "mmfl.tasks.standard_datasets"),
    "model": ("mmfl.tasks.models",),
    "sampler": ("mmfl.core.allocators", "mmfl.core.variance_reduced", "mmfl.core.group",
                "mmfl.core.scaffold"),
    "aggregator": ("mmfl.core.aggregation", "mmfl.core.stale_aggregators"),
    "engine": ("mmfl.engines", "mmfl.flower"),  # mmfl.flower registers "flower" without flwr
}


@dataclass(frozen=True)
class Option:
    """One option of a component: its type, default, allowed range and documentation.

    ``check`` is a small rule language: ``"> 0"``, ``">= 0"``, ``"0..1"`` (closed interval),
    ``"(0..1]"`` (half-open), ``"one of a|b|c"``, or ``""`` for none. ``type`` is one of int, float,
    str, bool, or ``"table"`` (a TOML table of number -> probability; see :func:`check_value`).
    """

    type: Any
    default: Any
    check: str = ""
    doc: str = ""
    #: The value under ``variant = "authors"`` (the authors' code's choice, see
    #: docs/reproduction.md); None: the same as ``default``.
    authors: Any = None

    def default_for(self, variant: str = "paper") -> Any:
        """The default under ``variant`` ("paper" or "authors")."""
        return self.authors if variant == "authors" and self.authors is not None else self.default


@dataclass
class Entry:
    name: str
    obj: Any
    options: dict[str, Option] = field(default_factory=dict)
    doc: str = ""
    #: ``__name__`` of the module whose code registered the component ("" if unknown): mmfl's
    #: own modules for the built-ins, the user's module (or ``__main__``) otherwise
    origin: str = ""

    @property
    def builtin(self) -> bool:
        """Registered by mmfl itself (a worker process gets it by importing mmfl)."""
        return self.origin == "mmfl" or self.origin.startswith("mmfl.")


_REGISTRY: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
_LOADED: set[str] = set()


def register(kind: str, name: str, *, options: dict[str, Option] | None = None, doc: str = ""):
    """Decorator registering ``obj`` as component ``name`` of ``kind``; returns ``obj`` unchanged.

    Re-registering a name replaces the previous entry (so user code may override a built-in).
    """
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")

    def deco(obj):
        text = doc or (obj.__doc__ or "").strip().split("\n")[0]
        origin = sys._getframe(1).f_globals.get("__name__", "")  # the registering module
        _REGISTRY[kind][name] = Entry(name, obj, dict(options or {}), text, str(origin))
        if isinstance(obj, type):  # the class reads its defaults from here (``opt``)
            obj.OPTIONS = dict(options or {})
        return obj

    return deco


class Component:
    """What samplers and aggregators share: validated ``options`` read through :meth:`opt`
    (defaults from the registered Option table), and checkpointable state."""

    #: the component's Option table (set by :func:`register`)
    OPTIONS: dict = {}

    def __init__(self, options: dict | None) -> None:
        self.options = dict(options or {})

    def opt(self, name: str) -> Any:
        """Option ``name`` as given, else its default in the registered Option table (the one
        place defaults live; a config run passes every option resolved)."""
        return self.options[name] if name in self.options else option_default(type(self), name)

    def state_dict(self) -> dict:
        """Checkpointable state (numpy arrays only); stateless components return ``{}``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (no-op for stateless components)."""
        return None


def option_default(cls: type, name: str) -> Any:
    """The registered default of option ``name`` for class ``cls``: from the Option table of
    ``cls`` or of the nearest registered base class that has it (a subclass registered with
    fewer options still runs its base's code, with the base's defaults)."""
    for klass in cls.__mro__:
        table = klass.__dict__.get("OPTIONS")
        if table and name in table:
            return table[name].default
    raise KeyError(f"{cls.__name__}: no registered option {name!r}")


def user_entries() -> list[tuple[str, Entry]]:
    """(kind, entry) of every component registered by code outside mmfl, kind by kind in
    registration order (what a worker process must be given, see
    :func:`mmfl.experiment.sweep.run_sweep`)."""
    return [(k, e) for k in KINDS for e in _REGISTRY[k].values() if not e.builtin]


def add_entry(kind: str, entry: Entry) -> None:
    """Put ``entry`` (e.g. one received from another process) into the registry as it was
    registered there: the built-ins of ``kind`` load first, so that the entry replaces a
    built-in of the same name as it did in the registering process."""
    _load_builtins(kind)
    _REGISTRY[kind][entry.name] = entry


def _load_builtins(kind: str) -> None:
    if kind in _LOADED:
        return
    _LOADED.add(kind)
    for mod in _BUILTIN_MODULES[kind]:
        importlib.import_module(mod)


def names(kind: str) -> list[str]:
    """Sorted names registered for ``kind`` (built-ins included)."""
    _load_builtins(kind)
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str, *, key: str | None = None) -> Entry:
    """The entry ``name`` of ``kind``; a :class:`ConfigError` naming ``key`` lists valid names."""
    _load_builtins(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY[kind]))
        raise ConfigError(key or kind, f"unknown {kind}; valid: {valid}", name) from None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_rule(key: str, value: Any, rule: str) -> None:
    if not rule:
        return
    rule = rule.strip()
    if rule.startswith("one of "):
        allowed = rule[len("one of "):].split("|")
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(allowed)}", value)
        return
    for op in (">=", "<=", ">", "<"):
        if rule.startswith(op):
            bound = float(rule[len(op):])
            ok = {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[op]
            if not ok:
                raise ConfigError(key, f"must be {op} {rule[len(op):].strip()}", value)
            return
    if ".." in rule:
        lo_closed = not rule.startswith("(")
        hi_closed = not rule.endswith(")")
        lo, hi = (float(x) for x in rule.strip("[]()").split(".."))
        ok = (value >= lo if lo_closed else value > lo) and (value <= hi if hi_closed else value < hi)
        if not ok:
            shown = ("[" if lo_closed else "(") + f"{_num(lo)}, {_num(hi)}" + ("]" if hi_closed else ")")
            raise ConfigError(key, f"must lie in {shown}", value)
        return
    raise ValueError(f"bad option rule {rule!r}")


def check_value(key: str, value: Any, spec: Option) -> Any:
    """Validate one option value against its spec; returns the (type-normalised) value."""
    t = spec.type
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "must be a boolean (true or false)", value)
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "must be an integer", value)
        _check_rule(key, value, spec.check)
        if not INT_MIN <= value <= INT_MAX:  # numpy and torch count and index with int64
            bound = f"at most {INT_MAX}" if value > 0 else f"at least {INT_MIN}"
            raise ConfigError(key, f"must be {bound} (a 64-bit integer)", value)
        return value
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, "must be a number", value)
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(key, "must be finite", value)
        value = number
    elif t is str:
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string", value)
    elif t == "table":
        return value  # validated by the owner
    _check_rule(key, value, spec.check)
    return value


def resolve_options(prefix: str, given: dict[str, Any], specs: dict[str, Option],
                    variant: str = "paper") -> dict[str, Any]:
    """Validate ``given`` against ``specs`` (unknown keys are errors) and fill in defaults: each
    option's paper default, or with ``variant="authors"`` its authors' value where it has one
    (:attr:`Option.authors`). A given value always wins."""
    out: dict[str, Any] = {}
    for k in given:
        if k not in specs:
            valid = ", ".join(sorted(specs)) or "none"
            raise ConfigError(f"{prefix}.{k}", f"unknown option; valid options: {valid}", given[k])
    for k, spec in specs.items():
        out[k] = (check_value(f"{prefix}.{k}", given[k], spec) if k in given
                  else spec.default_for(variant))
    return out


def describe(kind: str) -> list[tuple[str, str, dict[str, Option]]]:
    """(name, one-line doc, options) for every component of ``kind`` (for docs and --help)."""
    return [(n, _REGISTRY[kind][n].doc, _REGISTRY[kind][n].options) for n in names(kind)]


