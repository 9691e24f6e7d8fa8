"""napari-unireg: unsupervised deep-learning deformable registration of 3D brain MRI.

The library, the command line tool (``unireg``) and the napari plugin share one pipeline
(:mod:`napari_unireg.pipeline`; layout in docs/DESIGN.md). Heavy dependencies (torch, napari) are imported lazily.
"""

__version__ = "0.1.0"
