"""Shared pytest setup: import the package from this checkout; keep TF quiet."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# TF (used only by the data pipeline) stays quiet in test logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
