"""The main canvas shows an upright axial slice when a NIfTI file is opened, whatever its on-disk orientation.

Checked as a user would see it: the same asymmetric phantom (a bright marker in the patient's left-anterior-
superior region) is written as RAS, LPS and LIA files (nibabel reorients the voxels and the affine together, so
the three files hold the same anatomy), each is opened through the plugin's reader in a real viewer, and the
canvas screenshot is searched for the marker: anterior is up, the patient's left is on the screen's right in the
radiological convention and on its left in the neurological one. Run under ``xvfb-run -a``; with
``UNIREG_SCREENSHOT_DIR`` set the screenshots are kept there as PNG files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui

SHAPE = (40, 48, 36)  # RAS voxel grid of the phantom
SPACING = (1.2, 1.0, 1.5)
ORIGIN = (-24.0, -30.0, -20.0)
BRAIN, MARKER = 0.3, 1.0


def _phantom() -> tuple[np.ndarray, np.ndarray, tuple[slice, slice, slice]]:
    """(RAS data, RAS affine, marker box): a dim ellipsoid with a bright box in the left-anterior-superior part."""
    idx = np.indices(SHAPE, dtype=np.float32)
    c = (np.asarray(SHAPE, np.float32) - 1) / 2
    r = np.asarray(SHAPE, np.float32) / 2 - 1
    inside = sum(((idx[a] - c[a]) / r[a]) ** 2 for a in range(3)) <= 1.0
    data = np.where(inside, BRAIN, 0.0).astype(np.float32)
    # x increases to the patient's right, y to anterior, z to superior: left = low x, anterior = high y
    box = (slice(8, 16), slice(30, 40), slice(17, 30))
    data[box] = MARKER
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = ORIGIN
    return data, aff, box


def _write(tmp_path: Path, codes: str) -> Path:
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    data, aff, _ = _phantom()
    img = nib.Nifti1Image(data, aff)
    img = img.as_reoriented(ornt_transform(io_orientation(aff), axcodes2ornt(tuple(codes))))
    assert nib.aff2axcodes(img.affine) == tuple(codes)
    path = tmp_path / f"phantom_{codes}.nii.gz"
    nib.save(img, str(path))
    return path


def _marker_world_centre() -> np.ndarray:
    _, aff, box = _phantom()
    centre = np.array([(s.start + s.stop - 1) / 2 for s in box])
    return aff[:3, :3] @ centre + aff[:3, 3]


def _find(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (row, col) of the marker (white) and of the whole phantom on a screenshot.

    The canvas label is yellow (no blue), so requiring blue keeps it out of both masks."""
    rgb = img[..., :3].astype(float)
    grey = rgb.mean(-1)
    blue = rgb[..., 2]
    marker = (grey > 200) & (blue > 200)
    phantom = (grey > 30) & (blue > 30)
    assert marker.sum() > 50, "marker not visible on the canvas"
    return np.argwhere(marker).mean(0), np.argwhere(phantom).mean(0)


def _save(img: np.ndarray, name: str) -> None:
    out = os.environ.get("UNIREG_SCREENSHOT_DIR")
    if out:
        from qtpy.QtGui import QImage

        Path(out).mkdir(parents=True, exist_ok=True)
        a = np.ascontiguousarray(img[..., :4].astype(np.uint8))
        QImage(a.data, a.shape[1], a.shape[0], 4 * a.shape[1], QImage.Format.Format_RGBA8888).save(
            str(Path(out) / name)
        )


@pytest.fixture(autouse=True)
def convention():
    """Restore the plugin-wide left-right setting after a test."""
    from napari_unireg._napari import anatomical

    before = anatomical.radiological()
    yield anatomical
    anatomical.set_radiological(before)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LIA"])
def test_open_nifti_shows_axial_anterior_up(make_napari_viewer, tmp_path, qtbot, codes, convention):
    convention.set_radiological(True)
    path = _write(tmp_path, codes)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(900, 700)
    viewer.open(str(path), plugin="napari-unireg")
    [layer] = viewer.layers
    qtbot.wait(100)
    # the world is RAS mm whatever the file: the marker's world centre holds the marker (status bar = world mm)
    world = _marker_world_centre()
    assert layer.get_value(world, world=True) == pytest.approx(MARKER)
    # an axial plane through the marker's height (the canvas opens on the middle slice; move it into the marker)
    viewer.dims.set_point(2, world[2])
    assert tuple(viewer.dims.order) == (2, 1, 0)
    assert convention.text_overlay(viewer).visible and "Axial · radiological" in convention.text_overlay(viewer).text
    assert "R on the left, A up" in convention.text_overlay(viewer).text
    qtbot.wait(100)
    img = viewer.screenshot(canvas_only=True, flash=False)
    _save(img, f"orientation_{codes}_radiological.png")
    marker, phantom = _find(img)
    assert marker[0] < phantom[0] - 20  # anterior is up
    assert marker[1] > phantom[1] + 20  # the patient's left is on the screen's right (radiological)
    # neurological: the same slice mirrored left-right, anterior still up
    convention.set_radiological(False)
    assert "neurological" in convention.text_overlay(viewer).text
    qtbot.wait(100)
    img = viewer.screenshot(canvas_only=True, flash=False)
    _save(img, f"orientation_{codes}_neurological.png")
    marker, phantom = _find(img)
    assert marker[0] < phantom[0] - 20
    assert marker[1] < phantom[1] - 20
    # the slider moves the axial plane along S-I: below the marker's box the marker is gone
    viewer.dims.set_point(2, world[2] - 12 * SPACING[2])
    qtbot.wait(100)
    img = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    assert ((img.mean(-1) > 200) & (img[..., 2] > 200)).sum() == 0


def test_later_files_keep_the_users_plane(make_napari_viewer, tmp_path, convention):
    """Only the first file sets the plane: a user who switched to sagittal keeps it when opening another file."""
    viewer = make_napari_viewer()
    viewer.open(str(_write(tmp_path, "RAS")), plugin="napari-unireg")
    assert tuple(viewer.dims.order) == (2, 1, 0)
    convention.show_plane(viewer, 0)
    assert "Sagittal: A on the left, S up" == convention.text_overlay(viewer).text
    viewer.open(str(_write(tmp_path, "LPS")), plugin="napari-unireg")
    assert tuple(viewer.dims.order) == convention.plane_layout(0).order
    viewer.dims.ndisplay = 3
    assert not convention.text_overlay(viewer).visible  # no plane, no label


def test_describe_view():
    from napari_unireg._napari.anatomical import describe_view, plane_layout

    ax = plane_layout(2, radiological=True)
    assert describe_view(ax.order, ax.orientation2d) == "Axial · radiological: R on the left, A up"
    ax = plane_layout(2, radiological=False)
    assert describe_view(ax.order, ax.orientation2d) == "Axial · neurological: L on the left, A up"
    cor = plane_layout(1, radiological=True)
    assert describe_view(cor.order, cor.orientation2d) == "Coronal · radiological: R on the left, S up"
    # napari's default view of a 3D volume: a sagittal slice lying on its side
    assert describe_view((0, 1, 2), ("down", "right")) == "Sagittal: I on the left, P up"
    assert describe_view((0, 1, 2), ("down", "right"), ndisplay=3) == ""
