"""Shared pytest setup: import the package from this checkout, keep TF/JAX quiet and on the CPU."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# TF (used only by the data pipeline) must never grab an accelerator or flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES_FOR_TF", "")
