"""Fixtures of the dataset tests."""

import pytest

from mmfl.tasks import standard_datasets


@pytest.fixture
def isolated_data_dirs(tmp_path, monkeypatch):
    """No real data folder is searched: $MMFL_DATA unset, the default folder in tmp."""
    monkeypatch.delenv("MMFL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    standard_datasets.clear_cache()
    yield
    standard_datasets.clear_cache()
