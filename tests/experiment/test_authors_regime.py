"""The authors' regime as config: processors rule, evaluation slice, normalisation, eval_last,
the variant switch end to end, and configs/paper1_authors*.toml (docs/reproduction.md)."""

from __future__ import annotations

import numpy as np
import pytest
from testkit import ROOT, tiny_config_text

import mmfl
from mmfl import registry
from mmfl.errors import ConfigError
from mmfl.experiment.config import load_config
from mmfl.experiment.federation import authors_processors, build_federation


def _cfg(tmp_path, overrides=(), sampler="random", rounds=3):
    p = tmp_path / "c.toml"
    p.write_text(tiny_config_text(rounds=rounds, sampler=sampler), encoding="utf-8")
    return load_config(p, list(overrides))


@pytest.mark.parametrize("levels, expect", [
    ((1.0, 0.0, 0.0), lambda k: np.ones_like(k)),
    ((0.0, 1.0, 0.0), lambda k: np.maximum(1, k // 2)),
    ((0.0, 0.0, 1.0), lambda k: k),
])
def test_authors_processors_levels(levels, expect):
    held = np.array([1, 2, 3, 4, 5, 5, 4])
    b = authors_processors(held, levels, np.random.default_rng(0))
    np.testing.assert_array_equal(b, expect(held))


def test_authors_processors_frequencies():
    held = np.full(20_000, 5)
    b = authors_processors(held, (0.25, 0.5, 0.25), np.random.default_rng(1))
    freq = [np.mean(b == v) for v in (1, 2, 5)]
    np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=0.015)


def test_processors_authors_in_federation(tmp_path):
    cfg = _cfg(tmp_path, ["clients.processors=authors", "clients.processor_levels=[0, 0, 1]"])
    fed = build_federation(cfg)
    pop = fed.population
    np.testing.assert_array_equal(pop.capacity, pop.holds.sum(axis=1))  # experts: B_i = k_i
    assert cfg.to_dict()["clients"]["processors"] == "authors"


@pytest.mark.parametrize("override, key", [
    ("clients.processor_levels=[0.5, 0.5]", "clients.processor_levels"),
    ("clients.processor_levels=[0.5, 0.6, -0.1]", "clients.processor_levels"),
    ("clients.processors=fast", "clients.processors"),
    ("variant=theirs", "variant"),
    ("tasks[0].test_subset=middle", "tasks[0].test_subset"),
    ("tasks[0].class_mask=some", "tasks[0].class_mask"),
    ("eval_last=-1", "eval_last"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, [override])
    assert e.value.key == key


def test_sample_ranges_error_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, ["tasks[0].partition.kind=class_ranges",
                        "tasks[0].partition.sample_ranges=[[0.5, 1, 2]]"])
    assert e.value.key == "tasks[0].partition.sample_ranges"
    assert "fractions" in str(e.value)


@pytest.mark.parametrize("subset", ["first", "last", "random"])
def test_test_subset(tmp_path, subset):
    cfg = _cfg(tmp_path, ["tasks[0].test_samples=50", f"tasks[0].test_subset={subset}"])
    fed = build_federation(cfg)
    from mmfl.experiment.federation import load_dataset

    full = load_dataset(cfg.tasks[0], None, cfg.seed)
    got = fed.tasks[0].dataset
    assert len(got.y_test) == 50
    if subset == "first":
        np.testing.assert_array_equal(got.x_test, full.x_test[:50])
    elif subset == "last":
        np.testing.assert_array_equal(got.x_test, full.x_test[-50:])
    else:
        assert not np.array_equal(got.x_test, full.x_test[:50])


def test_fashion_mnist_half_normalisation():
    entry = registry.get("dataset", "fashion_mnist")
    from mmfl.tasks.datasets import FASHION_MNIST_SYSTEM_DIR

    if not FASHION_MNIST_SYSTEM_DIR.exists():
        pytest.skip("dataset-fashion-mnist is not installed")  # CI installs it
    half = entry.obj(registry.resolve_options("d", {"normalize": "half"}, entry.options), None, 0)
    std = entry.obj(registry.resolve_options("d", {}, entry.options), None, 0)
    assert half.x_train.min() == -1.0 and half.x_train.max() == 1.0
    np.testing.assert_allclose(half.x_train[:2], (std.x_train[:2] * 0.3530 + 0.2860 - 0.5) / 0.5,
                               atol=1e-5)


def test_eval_last_evaluates_the_last_rounds(tmp_path):
    cfg = _cfg(tmp_path, ["eval_every=10", "eval_last=3"], rounds=7)
    mmfl.run(cfg, tmp_path / "r")
    res = mmfl.read_results(tmp_path / "r")
    evaluated = sorted({int(r["round"]) for r in res.metrics if r["accuracy"] != ""})
    assert evaluated == [5, 6, 7]


def test_new_keys_stay_out_of_config_toml_unless_set(tmp_path):
    d = _cfg(tmp_path).to_dict()
    for key in ("variant", "eval_last"):
        assert key not in d
    assert "class_mask" not in d["tasks"][0] and "test_subset" not in d["tasks"][0]
    assert "processor_levels" not in d["clients"]
    d = _cfg(tmp_path, ["variant=authors", "sampler.name=gvr"]).to_dict()
    assert d["variant"] == "authors" and d["sampler"]["d_index"] == "authors"


SAMPLERS = sorted(registry.names("sampler"))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_with_the_authors_variant(tmp_path, sampler):
    cfg = _cfg(tmp_path, ["variant=authors"], sampler=sampler, rounds=3)
    summary = mmfl.run(cfg, tmp_path / "r")
    assert summary["status"] == "completed"


MAIN_PY_STALEVRE = ["sampler.init=random", "sampler.score=last", "sampler.budget=walk",
                    "sampler.b0=1.0"]


def test_stalevre_random_init_costs_one_full_computation_before_round_1(tmp_path):
    cfg = _cfg(tmp_path, MAIN_PY_STALEVRE, sampler="stalevre", rounds=3)
    mmfl.run(cfg, tmp_path / "r")
    rows = mmfl.read_results(tmp_path / "r").rounds
    fed = build_federation(cfg)
    m, pairs = fed.budget, int(fed.population.holds.sum())
    assert 0 < int(rows[0]["local_trainings"]) <= m  # a random round of m slots (pairs merged)
    assert int(rows[1]["local_trainings"]) == pairs             # the full computation
    assert int(rows[2]["local_trainings"]) < pairs              # then stored scores only


def test_stalevre_main_py_path_resume_is_exact(tmp_path):
    cfg = _cfg(tmp_path, MAIN_PY_STALEVRE, sampler="stalevre", rounds=4)
    mmfl.run(cfg, tmp_path / "a")
    short = cfg.replace(rounds=2)
    mmfl.run(short, tmp_path / "b")
    mmfl.run(cfg, tmp_path / "b", resume=True)
    a = (tmp_path / "a" / "metrics.csv").read_text()
    b = (tmp_path / "b" / "metrics.csv").read_text()
    assert a == b


@pytest.mark.parametrize("name", ["paper1_authors", "paper1_authors_paper"])
def test_paper1_authors_configs(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.clients.count == 120 and cfg.clients.active_rate == 0.1
    assert cfg.clients.processors == "authors"
    assert dict(cfg.clients.tasks_per_client) == {4: 0.1, 5: 0.9}
    for t in cfg.tasks:
        assert (t.model, t.class_mask, t.lr, t.local_epochs, t.batch_size) == (
            "authors_cnn", "zero", 0.01, 5, 500)
        assert t.partition.kind == "class_ranges"
        assert t.partition.options["sample_ranges"] == ((0.9, 9, 15), (0.1, 90, 150))
        assert (t.test_samples, t.test_subset) == (3000, "first")
        assert t.dataset_options["normalize"] == "half"
    assert cfg.variant == ("authors" if name == "paper1_authors" else "paper")


@pytest.mark.parametrize("sampler", ["fedfair", "fairvr"])
def test_fair_refresh_every_round_matches_evaluating_every_round(tmp_path, sampler):
    def accs(eval_every, refresh):
        out = tmp_path / f"{eval_every}{refresh}"
        cfg = _cfg(tmp_path, [f"eval_every={eval_every}", f"sampler.refresh={refresh}",
                              "sampler.alpha=8"],
                   sampler=sampler, rounds=6)
        mmfl.run(cfg, out)
        rows = mmfl.read_results(out).metrics
        return [(r["round"], r["task"], r["accuracy"]) for r in rows if r["round"] in ("3", "6")]

    every = accs(1, "evaluation")
    assert accs(3, "round") == every          # fresh f_s: the same allocations
    assert accs(3, "evaluation") != every     # stale f_s (the default): other allocations


def test_stalevre_authors_main2_costs_and_resume(tmp_path):
    """variant = authors: round 0 trains every pair once, later rounds a probe set and the
    sampled pairs; the probe store is checkpointed, so a resumed run equals a whole one."""
    cfg = _cfg(tmp_path, ["variant=authors"], sampler="stalevre", rounds=4)
    assert cfg.sampler.options["score"] == "probe"
    mmfl.run(cfg, tmp_path / "a")
    rows = mmfl.read_results(tmp_path / "a").rounds
    fed = build_federation(cfg)
    pairs = int(fed.population.holds.sum())
    assert int(rows[0]["local_trainings"]) == pairs
    for r in rows[1:]:  # probe set (<= m pairs) + the sampled pairs, each uploading a model
        assert int(r["local_trainings"]) == int(r["model_uploads"])
        assert int(r["local_trainings"]) > int(r["slots"]) - 1
    mmfl.run(cfg.replace(rounds=2), tmp_path / "b")
    mmfl.run(cfg, tmp_path / "b", resume=True)
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()


def test_processors_override_keeps_its_type():
    cfg = load_config(ROOT / "configs" / "paper1_authors.toml",
                      ["clients.processors=1", "clients.tasks_per_client=0"])
    assert cfg.clients.processors == 1 and cfg.clients.tasks_per_client == 0
    cfg = load_config(ROOT / "configs" / "quickstart.toml", ["clients.processors=authors"])
    assert cfg.clients.processors == "authors"
