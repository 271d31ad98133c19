"""Config validation: every invalid value names its dotted key, the rule and the value."""

from __future__ import annotations

import dataclasses

import pytest

from mmfl.errors import ConfigError, ConfigFileError
from mmfl.experiment import tomlio
from mmfl.experiment.config import budget_of, config_from_dict, load_config

from testkit import ROOT, run_cli, tiny_config_text


def raw():
    import tomllib

    return tomllib.loads(tiny_config_text())


def test_valid_config_resolves_defaults_and_is_frozen(tiny_config):
    cfg = load_config(tiny_config)
    assert cfg.rounds == 4 and cfg.eval_every == 1 and cfg.server_lr == 1.0
    assert cfg.clients.processors == ((1, 0.5), (2, 0.5))
    assert cfg.tasks[1].dataset_options["num_samples"] == 1200
    assert cfg.tasks[1].dataset_options["test_fraction"] == 0.2  # default filled
    assert cfg.tasks[0].partition.options["class_ratio"] == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 5  # frozen


def test_resolved_config_round_trips_through_toml(tiny_config):
    cfg = load_config(tiny_config)
    text = tomlio.dumps(cfg.to_dict())
    import tomllib

    assert config_from_dict(tomllib.loads(text)) == cfg


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("bogus=1", "bogus", "unknown key"),
        ("rounds=0", "rounds", "[1, 10000000]"),
        ("rounds=2.5", "rounds", "integer"),
        ("seed=-1", "seed", ">= 0"),
        ("engine=warp", "engine", "unknown engine"),
        ("clients.count=0", "clients.count", "[1, 10000000]"),
        ("threads=100000000", "threads", "1..256"),
        ("clients.processors={1 = 0.5, 5000 = 0.5}", "clients.processors.5000", "1..1024"),
        ("clients.active_rate=1.5", "clients.active_rate", "(0, 1]"),
        ("clients.active_rate=0", "clients.active_rate", "(0, 1]"),
        ("clients.processors=0", "clients.processors", "in 1..1024"),
        ("clients.processors={1 = 0.3, 2 = 0.3}", "clients.processors", "sum to 1"),
        ("clients.tasks_per_client=3", "clients.tasks_per_client", "in 0..2"),
        ("clients.extra=1", "clients.extra", "unknown key"),
        ("sampler.name=no_such_sampler", "sampler.name", "unknown sampler"),
        ("sampler.alpha=2", "sampler.alpha", "unknown option"),
        ("sampler.aggregator=magic", "sampler.aggregator", "unknown aggregator"),
        ("tasks[0].dataset=imagenet", "tasks[0].dataset", "unknown dataset"),
        ("tasks[1].model=transformer", "tasks[1].model", "unknown model"),
        ("tasks[0].lr=-0.1", "tasks[0].lr", "> 0"),
        ("tasks[0].lr=nan", "tasks[0].lr", "finite"),
        ("tasks[0].batch_size=0", "tasks[0].batch_size", "[1, 1000000000]"),
        ("tasks.wave.local_epochs=0", "tasks[1].local_epochs", "[1, 10000]"),
        ("tasks[0].partition.kind=zipf", "tasks[0].partition.kind", "must be one of"),
        ("tasks[0].partition.class_ratio=0", "tasks[0].partition.class_ratio", "(0, 1]"),
        ("tasks[1].partition.alpha=0", "tasks[1].partition.alpha", "> 0"),
        ("tasks[1].dataset_options.num_samples=0", "tasks[1].dataset_options.num_samples",
         "[1, 1000000]"),
        ("tasks[1].model_options.hidden=3", "tasks[1].model_options.hidden", "unknown option"),
        ("tasks[1].name=digits", "tasks[1].name", "duplicates"),
        ("tasks[0].name=bad-name", "tasks[0].name", "identifier"),
        ("sampler.draw=sometimes", "sampler.draw", "one of"),
        ("eval_every=0", "eval_every", ">= 1"),
        ("server.lr=0", "server.lr", "> 0"),
        ("threads=many", "threads", '"auto"'),
    ],
)
def test_invalid_values_name_key_rule_and_value(tiny_config, override, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config, [override])
    msg = str(e.value)
    assert e.value.key == key, msg
    assert msg.startswith(key + ":"), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_missing_tasks_and_required_task_keys():
    r = raw()
    del r["tasks"]
    with pytest.raises(ConfigError, match=r"^tasks:"):
        config_from_dict(r)
    r = raw()
    del r["tasks"][0]["dataset"]
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.dataset: is required"):
        config_from_dict(r)


def test_override_typing_by_schema(tiny_config):
    cfg = load_config(tiny_config, ["name=123", "tasks[0].lr=1", "sampler.name=full",
                                    "clients.processors={1 = 0.25, 3 = 0.75}"])
    assert cfg.name == "123" and cfg.tasks[0].lr == 1.0 and isinstance(cfg.tasks[0].lr, float)
    assert cfg.sampler.name == "full"
    assert cfg.clients.processors == ((1, 0.25), (3, 0.75))
    assert load_config(tiny_config).threads == "auto"  # the default
    assert load_config(tiny_config, ["threads=2"]).threads == 2
    with pytest.raises(ConfigError, match=r"^--set: must look like"):
        load_config(tiny_config, ["rounds"])
    with pytest.raises(ConfigError, match=r"tasks\.9: index out of range"):
        load_config(tiny_config, ["tasks.9.lr=1"])


def test_quantity_skew_alias(tiny_config):
    cfg = load_config(tiny_config, ["tasks[0].partition.quantity_skew={clients = 0.9, data = 0.1}"])
    assert cfg.tasks[0].partition.options["skew_clients"] == 0.9
    assert cfg.tasks[0].partition.options["skew_data"] == 0.1
    with pytest.raises(ConfigError, match="quantity_skew"):
        load_config(tiny_config, ["tasks[0].partition.quantity_skew=0.9"])


def test_budget_rules():
    cfg = config_from_dict(raw())
    assert budget_of(cfg.clients, 30) == 9
    with pytest.raises(ConfigError, match=r"^clients\.active_rate: gives a budget .* = 0"):
        budget_of(cfg.clients, 3)
    big = config_from_dict({**raw(), "clients": {**raw()["clients"], "budget": 100}})
    with pytest.raises(ConfigError, match=r"^clients\.budget: must not exceed .*P = 30"):
        budget_of(big.clients, 30)


def test_malformed_toml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('name = "x"\nrounds = = 3\n', encoding="utf-8")
    with pytest.raises(ConfigFileError, match=r"bad\.toml:2:\d+: malformed TOML"):
        load_config(p)
    with pytest.raises(ConfigFileError, match="not found"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "sampler.name=no_such_sampler"], "sampler.name"),
        (["--set", "clients.budget=10000"], "clients.budget"),
        (["--set", "tasks[0].dataset=nope"], "tasks[0].dataset"),
        (["--set", "clients.active_rate=2"], "clients.active_rate"),
    ],
)
def test_cli_config_errors_exit_2_without_traceback(tiny_config, tmp_path, args, fragment):
    r = run_cli("run", str(tiny_config), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def test_cli_malformed_toml_exit_2(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[clients\ncount = 3\n", encoding="utf-8")
    r = run_cli("run", str(p), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "bad.toml:1:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.rounds >= 1 and cfg.tasks


def test_example_config_is_generated_from_the_schema_and_runs(tmp_path):
    """configs/example.toml is exactly `mmfl config example` (regenerate it after a schema
    change), lists every sampler, dataset and model, and is a valid config that runs."""
    from mmfl import registry
    from mmfl.experiment.example import example_toml
    from mmfl.experiment.runner import run

    text = example_toml()
    committed = (ROOT / "configs" / "example.toml").read_text(encoding="utf-8")
    assert committed == text, "configs/example.toml is stale: run `mmfl config example --out " \
                              "configs/example.toml`"
    for kind in ("sampler", "dataset", "model", "aggregator", "engine"):
        for name in registry.names(kind):  # built-ins (other tests register their own)
            if registry.get(kind, name).obj.__module__.startswith("mmfl."):
                assert f"#   {name}: " in text, (kind, name)
    assert "#   gvr: " in text and "#   authors_cnn: " in text
    cfg = load_config(ROOT / "configs" / "example.toml", ["rounds=1", "clients.count=20"])
    assert cfg.threads == "auto" and cfg.clients.count == 20
    summary = run(cfg, tmp_path / "r")
    assert summary["status"] == "completed"
