#!/usr/bin/env python3
"""The judge: records -> leaderboard. Every number it shows is recomputed from the run logs.

    python leaderboard.py check | build | submit | show | compare | import-upstream | reproduce  (--help for each)

The logic lives in the package speedrun/records/; this file only runs it.
"""

import sys

from speedrun.records.cli import main

if __name__ == "__main__":
    sys.exit(main())
