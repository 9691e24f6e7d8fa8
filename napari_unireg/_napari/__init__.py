"""The napari front end: reader, writers, sample data, dock widgets and linked orthogonal views.

Everything here is thin over :mod:`napari_unireg.pipeline`; the pure array work lives in :mod:`.layers` and
:mod:`.status` so it is testable without a viewer. napari and Qt are imported only by the widget modules.
"""
