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



def _actions(parser) -> dict:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_a_shared_flag_means_the_same_in_every_entry_point():
    """Flags of more than one entry point come from one parent in bml.cli: same help, kind of value and choices."""
    import eval_bml
    import train_baseline
    import train_bml
    from bml import predict

    parsers = [module.get_args_parser() for module in (train_bml, train_baseline, eval_bml, predict)]
    shared = {"--data_root", "--device", "--amp", "--num_workers", "--image_size", "--transform", "--dataset",
              "--n_ways", "--n_shots", "--n_queries", "--ckp_path", "--no_progress", "--embed_batch_size"}
    for flag in shared:
        definitions = {(action.help, getattr(action.type, "__qualname__", None), tuple(action.choices or ()))
                       for parser in parsers
                       for option, action in _actions(parser).items() if option == flag}
        assert len(definitions) == 1, flag


def test_evaluation_and_prediction_keep_batch_size_as_the_embedding_batch():
    import eval_bml
    from bml import predict

    args = eval_bml.get_args_parser().parse_args(["--ckp_path", "x.pth", "--batch_size", "7"])
    assert args.embed_batch_size == 7 and (args.amp, args.n_shots, args.num_workers) == ("off", 5, None)
    args = predict.get_args_parser().parse_args(["--ckp_path", "x.pth", "--support", "s", "--query", "q"])
    assert (args.embed_batch_size, args.num_workers) == (64, None)   # None: sized from the CPUs when run
