"""Pure functions on arrays and tensors (numpy/torch in, numpy/torch out): geometry, sampling, correlation,
inversion, losses, metrics, pre-alignment, the classical optimiser. No file I/O; imports nothing of the package
but :mod:`napari_unireg.errors`."""
