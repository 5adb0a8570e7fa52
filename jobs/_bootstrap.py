"""Make the repository root importable when a job runs as ``python jobs/x.py`` (also in
a ``ray job submit --working-dir .`` copy, where raymia may not be installed)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
