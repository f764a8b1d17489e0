"""speedrun: the GPT-2 (124M) speedrun harness."""

from pathlib import Path

__version__ = "0.1.0"

# The repository root: every path written into a log or record is relative to it.
REPO_ROOT = Path(__file__).resolve().parent.parent
