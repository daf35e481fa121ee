"""The bench suites share bench/cases.py, one folder above the speed suites: put bench/ on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
