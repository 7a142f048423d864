"""The grokking race: train several methods side by side on one task and compare.

Every arm of a race (a method, possibly with its own hyperparameters) is trained for every
seed from the same data split, the same initial weights and the same batch order, with the
same evaluation schedule. The race reports, per arm, the steps and training seconds to reach
each validation-accuracy threshold, the final accuracies, the seconds per step and whether it
grokked within the budget, aggregated over seeds.

The modules, in the order data flows through them:

- ``config``: :class:`RaceConfig`, what defines a race; ``presets``: the named races of
  published setups, as data;
- ``methods``: THE method registry (also used by ``grokopt bench`` and listed in
  docs/race.md), the penalty route and the one training step; ``specs``: arm specs
  ``"grokfast+grokalign:lamb=5,wd=0.01"`` and the KEY=VALUE parser; ``muon``: Muon's
  parameter split;
- ``engine``: one run (one arm, one seed); ``run``: :func:`run_race`, checkpoints and resume;
  ``progress``: bars and log lines; ``device``: the device resolver and environment probe;
- ``report``: :class:`RaceResult` and its JSON, CSV, figure and table; ``leaderboard``:
  several races folded into one table.

Use it from Python::

    from grokopt import RaceConfig, run_race
    result = run_race(RaceConfig(methods=("baseline", "grokfast"), steps=2000), out_dir="out")

or from the command line: ``grokopt race --help``.
"""

from .config import RaceConfig, with_matched_baselines
from .device import resolve_device
from .methods import METHODS, Method, MethodContext, TrainParts, register_method
from .presets import PRESETS, Preset
from .report import RaceResult, plot_race, results_table, write_outputs
from .run import check_config, check_out_dir, run_race
from .specs import RunSpec, parse_run_spec

__all__ = [
    "METHODS",
    "PRESETS",
    "Method",
    "MethodContext",
    "Preset",
    "RaceConfig",
    "RaceResult",
    "RunSpec",
    "TrainParts",
    "check_config",
    "check_out_dir",
    "parse_run_spec",
    "plot_race",
    "register_method",
    "resolve_device",
    "results_table",
    "run_race",
    "with_matched_baselines",
    "write_outputs",
]
