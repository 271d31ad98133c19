"""scripts/differential.py reads both codes' per-round CSVs (docs/paper1_authors) into the table
of docs/reproduction.md."""

import importlib.util
import re

from testkit import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("differential", ROOT / "scripts" / "differential.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_from_the_committed_runs(capsys):
    data = ROOT / "docs" / "paper1_authors"
    assert _module().main(["--authors", str(data / "authors"), "--mmfl", str(data / "mmfl" / "authors"),
                           "--methods", "random,lvr", "--rounds", "1,30", "--window", "21-30"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| random") or
            r.startswith("| lvr")]
    assert [r.split("|")[2].strip() for r in rows] == ["authors", "mmfl", "authors", "mmfl"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert cells[2] == "3"  # seeds
        mean, _, worst, _ = (float(x) for x in re.findall(r"0\.\d{3}", cells[4]))
        assert 0.1 < worst <= mean < 1  # round 30: mean ± std / worst ± std


def test_mmfl_run_reads_accuracy_per_round(tmp_path):
    run = tmp_path / "random_s1"
    run.mkdir()
    (run / "metrics.csv").write_text("round,task,accuracy\n1,a,0.5\n1,b,0.25\n2,a,\n2,b,\n")
    (run / "timing.csv").write_text("round,round_seconds\n1,2.0\n2,1.0\n")
    acc, secs = _module().mmfl_run(run)
    assert acc.shape == (2, 2) and acc[0].tolist() == [0.5, 0.25]
    assert secs.tolist() == [2.0, 1.0]
