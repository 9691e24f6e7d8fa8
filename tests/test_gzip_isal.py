"""With the optional ISA-L compressor (``isal``) a .nii.gz holds exactly the bytes nibabel itself writes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from napari_unireg.io import nifti


def test_isal_gzip_holds_nibabels_bytes(tmp_path):
    pytest.importorskip("isal")
    rng = np.random.default_rng(0)
    img = nib.Nifti1Image(rng.standard_normal((9, 8, 7, 1, 3)).astype(np.float32), np.diag([0.5, 1, 2, 1.0]))
    img.header.set_intent("vector", (), name="displacement")
    nifti._save_nifti(img, tmp_path / "isal.nii.gz")
    nib.save(img, str(tmp_path / "ref.nii.gz"))  # nibabel's own zlib path
    assert gzip.open(tmp_path / "isal.nii.gz").read() == gzip.open(tmp_path / "ref.nii.gz").read()
    back = nib.load(str(tmp_path / "isal.nii.gz"))
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
