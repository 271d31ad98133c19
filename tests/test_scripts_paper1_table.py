"""scripts/paper1_table.py: the papers' metric per sampler from sweep folders."""

import importlib.util
import json

from testkit import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("paper1_table", ROOT / "scripts" / "paper1_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder, sampler, seed, mean, worst, status="completed", seconds=(9.0, 2.0, 4.0)):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "status": status, "sampler": sampler, "seed": seed, "rounds_completed": 3,
        "final_window": 2, "mean_accuracy_window": mean, "min_accuracy_window": worst,
        "cost": {"local_trainings": 30}}))
    (folder / "timing.csv").write_text("round,train_seconds,eval_seconds,round_seconds\n" + "".join(
        f"{i + 1},0,0,{s}\n" for i, s in enumerate(seconds)))


def test_rows_pool_seeds_in_the_papers_order(tmp_path, capsys):
    _run(tmp_path / "sweep" / "lvr" / "s1", "lvr", 1, 0.5, 0.4)
    _run(tmp_path / "sweep" / "random" / "s1", "random", 1, 0.2, 0.1)
    _run(tmp_path / "sweep" / "random" / "s2", "random", 2, 0.4, 0.3)
    _run(tmp_path / "sweep" / "random" / "s3", "random", 3, 0.9, 0.9, status="running")
    assert _module().main([str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| random | 2 | 3 | 2 | 0.300 ± 0.141 | 0.200 ± 0.141 | 10.0 | 3.0 ± 0.0 |"
    assert lines[3] == "| lvr | 1 | 3 | 2 | 0.500 | 0.400 | 10.0 | 3.0 |"
    assert len(lines) == 4  # the running run is left out
