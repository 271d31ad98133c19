"""``configs/example.toml``, generated from the schema: every key with its default, rule and
meaning, and every component's options, from the same Option tables that validate a config
(``mmfl config example``; a test fails when the committed file differs)."""

from __future__ import annotations

import textwrap
from typing import Any

from mmfl import registry
from mmfl.experiment import tomlio
from mmfl.experiment.config import (CLIENTS, FLOWER, LOGGING, SAMPLER_FIXED, SERVER,
                                   SERVER_OPTIMIZERS,
                                   SYSTEM, TASK, TOP)
from mmfl.registry import Option
from mmfl.tasks.partition import PARTITION_OPTIONS

__all__ = ["example_toml"]

WIDTH = 100   # line width of the file
COLUMN = 26   # where comments start

HEADER = """\
# configs/example.toml: every mmfl option with its default and meaning. Generated from the
# schema by `mmfl config example > configs/example.toml`; do not edit by hand.
# Validate a config without training:  mmfl describe CONFIG
# Override any key at run time:        --set rounds=50 --set sampler.name=lvr --set tasks[0].lr=0.1
# (tasks are addressed as tasks[0], tasks.0 or tasks.NAME). `mmfl components` lists every
# dataset, model, sampler, aggregator and engine with its options. [authors: x] marks the value
# that variant = "authors" selects (docs/reproduction.md).
"""

#: the example task (its dataset ships with scikit-learn, so the file runs anywhere)
EXAMPLE_TASK = {"name": "digits", "dataset": "digits"}


def _value(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return tomlio.scalar(v)


def _note(spec: Option) -> str:
    """The comment of an option: its doc, rule and authors' value."""
    text = spec.doc.rstrip(".") if spec.doc else ""
    if spec.check and not spec.check.startswith("one of"):
        text += f" [{spec.check}]"
    elif spec.check:
        text += f" [{spec.check[len('one of '):]}]"
    if spec.authors is not None:
        text += f" [authors: {_value(spec.authors)}]"
    return text


def _comment_lines(text: str, first: str) -> list[str]:
    """``first`` (may be empty) followed by ``# text`` wrapped at :data:`WIDTH`, continuation
    lines indented to :data:`COLUMN`."""
    if not text:
        return [first]
    pad = max(COLUMN, len(first) + 1)
    body = textwrap.wrap(text, WIDTH - pad - 2) or [""]
    lines = [f"{first:<{pad}}# {body[0]}"]
    lines += [f"{'':<{pad}}#   {line}" for line in body[1:]]
    return lines


def _keys(schema: dict[str, Option], values: dict[str, Any] | None = None) -> list[str]:
    out: list[str] = []
    for key, spec in schema.items():
        v = (values or {}).get(key, spec.default)
        out += _comment_lines(_note(spec), f"{key} = {_value(v)}")
    return out


def _component_block(kind: str, title: str) -> list[str]:
    """Commented list of every ``kind`` component with its options."""
    out = [f"# {title}:"]
    for name, doc, options in registry.describe(kind):
        if not registry.get(kind, name).obj.__module__.startswith("mmfl."):
            continue  # a user's component registered in this process is not the schema
        out += [f"#   {line}" for line in textwrap.wrap(f"{name}: {doc}", WIDTH - 4)]
        for key, spec in options.items():
            note = _note(spec)
            out += [f"#       {line}" for line in textwrap.wrap(
                f"{key} = {_value(spec.default)}" + (f"  ({note})" if note else ""), WIDTH - 8)]
    return out


def example_toml() -> str:
    """The text of configs/example.toml (a valid config: it validates and runs)."""
    lines = HEADER.rstrip("\n").split("\n") + [""]
    lines += _keys(TOP, {"name": "example"})
    lines += ["", "[server]"] + _keys(SERVER)
    lines += ["# [server.optimizer_options] of each server optimizer:"]
    for name, options in SERVER_OPTIMIZERS.items():
        for key, spec in options.items():
            note = _note(spec)
            lines += [f"#   {line}" for line in textwrap.wrap(
                f"{name}: {key} = {_value(spec.default)}" + (f"  ({note})" if note else ""),
                WIDTH - 4)]
    lines += ["", "[clients]"] + _keys(CLIENTS)
    lines += ["", "[system]"] + _keys(SYSTEM)
    lines += ["", "[sampler]"] + _keys(SAMPLER_FIXED)
    lines += ["# a sampler's options sit in this table (unknown options are errors)"]
    lines += _component_block("sampler", "samplers (sampler.name) and their options")
    lines += _component_block("aggregator", "aggregators (sampler.aggregator; their options are "
                              "read from [sampler])")
    lines += _component_block("engine", "engines (engine)")
    lines += ["", "[[tasks]]"] + _keys(TASK, EXAMPLE_TASK)
    lines += _component_block("dataset", "datasets (dataset) and their dataset_options")
    lines += _component_block("model", "models (model) and their model_options")
    lines += ["[tasks.partition]"]
    lines += _comment_lines("how the task's training data is split over the clients holding "
                            f"it: {' | '.join(PARTITION_OPTIONS)}", 'kind = "iid"')
    lines += _keys(PARTITION_OPTIONS["iid"])
    lines += ["# options of the other kinds:"]
    for kind, options in PARTITION_OPTIONS.items():
        if kind == "iid":
            continue
        for key, spec in options.items():
            note = _note(spec)
            lines += [f"#   {line}" for line in textwrap.wrap(
                f"{kind}: {key} = {_value(spec.default)}" + (f"  ({note})" if note else ""),
                WIDTH - 4)]
    lines += ["", "[flower]                  # engine \"flower\" only (docs/flower.md)"]
    lines += _keys(FLOWER)
    lines += ["", "[logging]                 # where the rounds are also reported"]
    lines += _keys(LOGGING)
    return "\n".join(line.rstrip() for line in lines) + "\n"
