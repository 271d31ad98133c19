"""clients.federation_file: a federation read from a file (paired comparisons)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from testkit import tiny_config_text

import mmfl
from mmfl.experiment.config import load_config
from mmfl.experiment.federation import build_federation


def _cfg(tmp_path, path, overrides=()):
    p = tmp_path / "cfg.toml"
    p.write_text(tiny_config_text(rounds=2), encoding="utf-8")
    return load_config(p, [f'clients.federation_file="{path}"', *overrides])


@pytest.fixture
def drawn(tmp_path):
    """The tiny config's own (drawn) federation, written as a federation file."""
    p = tmp_path / "cfg0.toml"
    p.write_text(tiny_config_text(rounds=2), encoding="utf-8")
    fed = build_federation(load_config(p))
    pop = fed.population
    raw = {"membership": (pop.n_samples > 0).astype(int).tolist(),
           "processors": pop.capacity.tolist(),
           "indices": [[idx.tolist() for idx in td.client_indices] for td in fed.tasks]}
    path = tmp_path / "fed.json"
    path.write_text(json.dumps(raw))
    return fed, raw, path


def test_the_file_reproduces_a_federation_and_its_run(tmp_path, drawn):
    fed, raw, path = drawn
    got = build_federation(_cfg(tmp_path, path))
    assert np.array_equal(got.population.n_samples, fed.population.n_samples)
    assert np.array_equal(got.population.capacity, fed.population.capacity)
    assert got.budget == fed.budget
    for a, b in zip(got.tasks, fed.tasks):
        assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))


def test_a_changed_file_changes_the_federation(tmp_path, drawn):
    _, raw, path = drawn
    raw["processors"] = [3] * len(raw["processors"])
    raw["membership"][0] = [0] * len(raw["membership"][0])  # client 0 holds nothing
    path.write_text(json.dumps(raw))
    got = build_federation(_cfg(tmp_path, path))
    assert (got.population.capacity == 3).all()
    assert (got.population.n_samples[0] == 0).all()
    mmfl.run(_cfg(tmp_path, path), tmp_path / "r")  # and it runs


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("indices"), "needs the keys"),
    (lambda r: r["membership"].pop(), r"membership must be \d+ x 2"),
    (lambda r: r.update(processors=[0] * len(r["processors"])), "processors must be"),
    (lambda r: r["indices"][0][1].append(10 ** 9), r"indices\[0\]\[1\] reaches outside"),
    (lambda r: r["indices"][1].pop(), r"indices\[1\] must hold one list per client"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, drawn, edit, message):
    _, raw, path = drawn
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(mmfl.DataError, match=rf"fed\.json: .*{message}"):
        build_federation(_cfg(tmp_path, path))


def test_train_samples_must_be_zero(tmp_path, drawn):
    _, _, path = drawn
    with pytest.raises(mmfl.ConfigError, match=r"tasks\[0\]\.train_samples: must be 0"):
        build_federation(_cfg(tmp_path, path, ["tasks[0].train_samples=100"]))
