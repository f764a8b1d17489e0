"""The optimizers, one per file, and how each recipe builds them.

- muon.py      Muon (the Sub3Min recipe's matrices)
- build.py     build_optimizers / set_schedules: the Sub3Min recipe (Muon + Adam) and the AdamW baseline
- normuon.py   NorMuon with Polar Express, cautious weight decay and an fp32 master for bf16 weights (record #89)
- adam.py      Adam with cautious weight decay (record #89)
- record89.py  NorMuonAdam: record #89's optimizer over every parameter (odd-step Adam, tied embedding, ranks)
"""

from speedrun.optim.build import build_optimizers, set_schedules
from speedrun.optim.muon import Muon
from speedrun.optim.record89 import NorMuonAdam

__all__ = ["Muon", "NorMuonAdam", "build_optimizers", "set_schedules"]
