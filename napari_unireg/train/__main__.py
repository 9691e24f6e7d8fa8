"""``python -m napari_unireg.train``: the same command as ``unireg train`` (convenient under ``torchrun``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
