"""The benchmark runner behind `python -m mmfast bench` (runner), its outputs (report) and how an
op declares its cases (registry; the cases themselves are in benchmarks/<op>.py)."""
from mmfast.bench.registry import MODES, Case, Target, register

__all__ = ["Case", "Target", "register", "MODES"]
