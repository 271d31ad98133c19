"""mmfl.core must stay pure numpy."""

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_core_does_not_import_torch():
    code = (
        "import sys\n"
        "import mmfl.core.allocators, mmfl.core.aggregation, mmfl.core.metrics\n"
        "from mmfl import registry\n"
        "registry.names('sampler'); registry.names('aggregator')\n"
        "bad = [m for m in ('torch', 'flwr') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "LOADED []" in res.stdout
