"""The command lines answer `--help` without importing what only training or evaluation needs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each costs from a tenth of a second to over a second to import (torch._dynamo: about one, more on a busy CPU).
HEAVY_MODULES = ("torch._dynamo", "torchvision", "torch.utils.tensorboard", "tensorboard", "matplotlib", "scipy")

PROBE = """
import json, sys
import eval_bml, train_baseline, train_bml
for script in (train_bml, train_baseline, eval_bml):
    script.get_args_parser().format_help()
heavy = json.loads(sys.argv[1])
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""


def test_building_the_parsers_imports_no_heavy_module():
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY_MODULES)], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []

