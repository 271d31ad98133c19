"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from testkit import tiny_config_text


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A tiny, fast experiment (16 clients, 2 offline tasks, 4 rounds) written to tmp_path."""
    p = tmp_path / "tiny.toml"
    p.write_text(tiny_config_text(), encoding="utf-8")
    return p
