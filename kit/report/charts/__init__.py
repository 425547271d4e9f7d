"""Charts: altair specs drawn from the tidy frames that kit's compute functions return.

Chart functions take a frame (e.g. :func:`kit.analysis.compare.compare_models`,
:func:`kit.analysis.compare.flip_table`, :func:`kit.analysis.slices.worst_slices`) and return an altair
chart. They never compute a metric: they select the rows to show and encode columns;
display-only transforms (a label joined from two columns, a colour category read from the
CI bounds) happen in the chart spec. The metric's direction comes from
:data:`kit.scoring.METRICS`.

altair is imported by the chart modules only, so ``import kit`` and headless runs that draw
nothing never load it. Modules: :mod:`kit.report.charts.comparison`,
:mod:`kit.report.charts.calibration`, :mod:`kit.report.charts.serving`.
"""
