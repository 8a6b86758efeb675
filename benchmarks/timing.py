"""Timing helpers shared by the benchmark scripts (they live in :mod:`valuefn.bench.figures`)."""

from valuefn.bench.figures import Timing, format_table, measure, measure_many

__all__ = ["Timing", "format_table", "measure", "measure_many"]
