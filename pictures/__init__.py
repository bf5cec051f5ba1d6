"""The pictures that ``visualize.py`` draws, one module per job; ``visualize.py`` is the command line.

``draw.py`` holds what the Pillow pictures share: the panel layout (``figure_size``, ``_panel_xy``),
fonts and text fitting, the canvas, labels, dots, display resizing and the image -> normalised tensor
conversion. ``features.py`` draws the dense features' first three principal components as RGB
(``render_features``); ``matches.py`` two crops of one image with their location and feature-space
matches (``compute_matches``, ``render_matches``); ``curves.py`` reads ``stats.txt`` files
(``read_stats``, refusing hostile lines) and plots them with matplotlib (``curves_figure``,
``render_curves``), imported only when a curve is drawn, so that ``features`` and ``matches`` run
without it. These modules take backbones and images as arguments and never import ``visualize.py``.
"""
