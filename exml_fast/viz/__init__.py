"""Pictures: image grids of (synthetic) batches (:mod:`~exml_fast.viz.grids`, torchvision's PNG encoder) and
line and matrix plots (:mod:`~exml_fast.viz.plots`, matplotlib). Nothing here knows about continual learning:
:mod:`exml_fast.cl.metrics` turns its results into the curves and matrices drawn here."""

from exml_fast.viz.grids import save_grid, to_unit_range
from exml_fast.viz.plots import (COLOURS, LINE_STYLES, Curve, accuracy_matrix_figure, curves_figure, line_styles,
                                 plot_curves, plot_sample_grids, round_robin, save_png)

__all__ = ["COLOURS", "LINE_STYLES", "Curve", "accuracy_matrix_figure", "curves_figure", "line_styles",
           "plot_curves", "plot_sample_grids", "round_robin", "save_grid", "save_png", "to_unit_range"]
