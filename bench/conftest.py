"""The bench suites share bench/cases.py, one folder above the speed suites: put bench/ on sys.path.
The capture-cost suite builds its models from tests/capture_models.py: tests/ goes last."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
