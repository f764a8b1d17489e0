#!/usr/bin/env python3
"""The judge: records -> leaderboard. Every number it shows is recomputed from the run logs.

    python leaderboard.py check | build | submit | show | compare | import-upstream  (--help for each)

The logic lives in speedrun/records*.py and speedrun/leaderboard_*.py; this file only runs it.
"""

import sys

from speedrun.leaderboard_cli import main

if __name__ == "__main__":
    sys.exit(main())
