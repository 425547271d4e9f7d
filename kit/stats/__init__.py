"""Statistics in one place: intervals, the bootstrap, tests and sample sizes.

Every interval names its method (:data:`kit.stats.intervals.METHODS`) in the evidence it
feeds, and each is coverage-tested at small n and at zero events
(``tests/test_stats_coverage.py``, ``benchmarks/verdict_calibration.py``).
"""
