"""Publication figures (napari_unireg.viz): layout, panel values, orientation, files and the `unireg figure` CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from napari_unireg.core import metrics as M
from napari_unireg.errors import UserError
from napari_unireg.viz import colors as C
from napari_unireg.viz import panels as P
from napari_unireg.viz.grid import ROWS, FigureStyle, comparison_figure, figure_filename, get_panel, save_figure

SHAPE = (40, 48, 36)


def _blob(shape=SHAPE, seed=0):
    r = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (g**2).sum(0) < 0.8
    tex = ndimage.gaussian_filter(r.random(shape), 2.0)
    img = np.where(brain, 0.3 + (tex - tex.min()) / np.ptp(tex) * 0.7, 0.0).astype(np.float32)
    lab = np.where(brain, np.where(g[0] < 0, 1, 20), 0).astype(np.uint8)
    lab[brain & ((g**2).sum(0) < 0.15)] = 3
    return img, lab


def _field(shape=SHAPE, amp=2.0, sigma=3.0, seed=1):
    r = np.random.default_rng(seed)
    f = np.stack([ndimage.gaussian_filter(r.normal(size=shape), sigma) for _ in range(3)])
    return (f * amp / np.abs(f).max()).astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    fixed, fseg = _blob(seed=0)
    u = _field(amp=2.0, seed=5)
    pts = np.indices(SHAPE, dtype=np.float64) - u
    moving = ndimage.map_coordinates(fixed, pts, order=1, mode="nearest").astype(np.float32)
    mseg = ndimage.map_coordinates(fseg, pts, order=0, mode="constant").astype(np.uint8)
    return fixed, moving, fseg, mseg


def _methods(n, shape=SHAPE):
    return {f"m{k}": _field(shape, amp=1.0 + 0.5 * (k % 4), seed=10 + k) for k in range(n)}


# --------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("n", range(1, 13))
def test_grid_has_a_column_per_method(pair, n):
    fixed, moving, fseg, mseg = pair
    rows = ("deformed", "jacobian") if n not in (1, 12) else ROWS
    fig = comparison_figure(fixed, moving, _methods(n), fseg, mseg, axis=2, rows=rows)
    gs = next(iter(fig.unireg_panels.values())).get_subplotspec().get_gridspec()
    assert gs.get_geometry() == (len(rows), n + 3)  # Fixed, Moving, n methods, title column
    assert gs.get_width_ratios() == [1.0] * (n + 2) + [0.15]
    counts = {r: sum(1 for (row, _) in fig.unireg_panels if row == r) for r in rows}
    expected = {"deformed": n + 2, "difference": n + 1, "labels": n + 2, "grid": n, "jacobian": n}
    assert counts == {r: expected[r] for r in rows}
    first_row = [ax for ax in fig.axes if ax.get_subplotspec() is not None
                 and ax.get_subplotspec().rowspan.start == 0]
    titles = [ax.get_title() for ax in first_row if ax.get_title()]
    assert titles == ["Fixed", "Moving", *[f"m{k}" for k in range(n)]]
    if n in (1, 12):  # the difference/Jacobian colour bars sit in the empty Fixed/Moving cells
        cbars = [c for ax in fig.axes for c in ax.child_axes if c.get_label() == "<colorbar>"]
        assert len(cbars) == 2
        ticks = sorted(tuple(np.round(cb.get_yticks(), 3)) for cb in cbars)
        assert ticks == [(-1.0, 0.0, 1.0, 2.0, 3.0), (-0.1, -0.05, 0.0, 0.05, 0.1)]
    assert fig._suptitle.get_text() == f"Fixed: fixed, Moving: moving, Axis: 2, Slice: {SHAPE[2] // 2 + 1}/{SHAPE[2]}"


def test_row_subset_order_and_labels_without_segs(pair):
    fixed, moving, _, _ = pair
    fig = comparison_figure(fixed, moving, _methods(2))
    assert fig.unireg_info["rows"] == ["deformed", "difference", "grid", "jacobian"]
    fig = comparison_figure(fixed, moving, _methods(2), rows=("jacobian", "deformed"))
    assert fig.unireg_info["rows"] == ["jacobian", "deformed"]
    with pytest.raises(UserError):
        comparison_figure(fixed, moving, _methods(2), rows=("labels",))
    with pytest.raises(UserError):
        comparison_figure(fixed, moving, _methods(2), rows=("nope",))
    with pytest.raises(UserError):
        comparison_figure(fixed, moving, {"a": np.zeros((3, 10, 10, 10))})
    with pytest.raises(UserError):
        comparison_figure(fixed, moving, _methods(1), bogus_style=1)


def test_default_slices_are_the_papers():
    shape = (160, 224, 192)
    assert [P.default_slice_index(shape, a) for a in range(3)] == [70, 112, 96]
    names = [figure_filename("0004", "0236", a, P.default_slice_index(shape, a), shape[a]) for a in range(3)]
    assert names == ["f0004_m0236_axis0_slc071of160.png", "f0004_m0236_axis1_slc113of224.png",
                     "f0004_m0236_axis2_slc097of192.png"]


# --------------------------------------------------------------------------------------------- panel values
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_jacobian_panel_shows_metrics_values(pair, axis):
    fixed, moving, fseg, mseg = pair
    methods = _methods(2)
    methods["fold"] = _field(amp=6.0, sigma=1.5, seed=3)  # strong enough to fold somewhere
    idx = SHAPE[axis] // 2 + 1
    fig = comparison_figure(fixed, moving, methods, fseg, mseg, axis=axis, slice_index=idx)
    for name, u in methods.items():
        ax = get_panel(fig, "jacobian", name)
        shown = np.asarray(ax.images[0].get_array())
        expected = P.orient_slice(np.take(M.jacobian_determinant(u), idx, axis=axis))
        np.testing.assert_array_equal(shown, expected)
        assert ax.images[0].get_clim() == (-1.0, 3.0)
    jac_fold = np.take(M.jacobian_determinant(methods["fold"]), idx, axis=axis)
    assert jac_fold.min() < 0  # the test field folds on this slice ...
    assert len(get_panel(fig, "jacobian", "fold").collections) == 1  # ... and the J = 0 contour is drawn


def test_jacobian_slice_near_the_border_is_one():
    u = _field(amp=3.0, seed=2)
    for axis in range(3):
        for idx in (0, 1, SHAPE[axis] - 2, SHAPE[axis] - 1):
            np.testing.assert_array_equal(P.jacobian_slice(u, axis, idx), np.take(M.jacobian_determinant(u), idx, axis))


@pytest.mark.parametrize("axis", [0, 2])
def test_difference_and_deformed_panels_are_the_warp(pair, axis):
    import torch

    from napari_unireg.core.sample import warp

    fixed, moving, fseg, mseg = pair
    methods = _methods(2)
    fig = comparison_figure(fixed, moving, methods, fseg, mseg, axis=axis)
    idx = fig.unireg_info["slice_index"]
    for name, u in methods.items():
        pts = np.indices(SHAPE, dtype=np.float64) + u
        warped = ndimage.map_coordinates(moving, pts, order=1, mode="nearest")
        want = P.orient_slice(np.take(warped - fixed, idx, axis=axis))
        got = np.asarray(get_panel(fig, "difference", name).images[0].get_array())
        np.testing.assert_allclose(got, want, atol=1e-6)
        # the same as the engine's torch warp (bilinear, border, align_corners=True)
        w_t = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(u)[None])[0, 0].numpy()
        np.testing.assert_allclose(got, P.orient_slice(np.take(w_t - fixed, idx, axis=axis)), atol=1e-4)
        dep = np.asarray(get_panel(fig, "deformed", name).images[0].get_array())
        np.testing.assert_allclose(dep, P.orient_slice(np.take(warped, idx, axis=axis)), atol=1e-6)
    got = np.asarray(get_panel(fig, "difference", "Moving").images[0].get_array())
    np.testing.assert_allclose(got, P.orient_slice(np.take(moving - fixed, idx, axis=axis)), atol=1e-7)
    im = get_panel(fig, "difference", "m0").images[0]
    assert im.get_clim() == (-0.1, 0.1) and im.get_cmap().name == "coolwarm"
    assert get_panel(fig, "deformed", "Fixed").images[0].get_clim() == (0.0, 0.75)


def test_label_and_grid_panels(pair):
    fixed, moving, fseg, mseg = pair
    u = _methods(1)["m0"]
    fig = comparison_figure(fixed, moving, {"m0": u}, fseg, mseg, axis=1)
    idx = fig.unireg_info["slice_index"]
    lab = np.asarray(get_panel(fig, "labels", "m0").images[0].get_array())
    np.testing.assert_array_equal(lab, P.orient_slice(np.take(M.warp_labels_nearest(mseg, u), idx, axis=1)))
    # the grid: a 3-D volume, lines every 8 voxels along the in-plane axes (0 and 2), constant along axis 1,
    # warped trilinearly with border padding
    gvol = np.zeros(SHAPE, np.float32)
    gvol[::8, :, :] = 1
    gvol[:, :, ::8] = 1
    pts = np.indices(SHAPE, dtype=np.float64) + u
    want = ndimage.map_coordinates(gvol, pts, order=1, mode="nearest")
    got = np.asarray(get_panel(fig, "grid", "m0").images[0].get_array())
    np.testing.assert_allclose(got, P.orient_slice(np.take(want, idx, axis=1)), atol=1e-5)
    assert "grid" not in {row for (row, col) in fig.unireg_panels if col in ("Fixed", "Moving")}


def test_label_colours():
    cols = C.label_colors(35)
    assert cols.shape == (36, 3)
    np.testing.assert_array_equal(cols[:7], [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1],
                                             [1, 0, 1]])
    np.testing.assert_allclose(cols[35], np.array([139, 69, 19]) / 255)
    big = C.label_colors(133)
    assert big.shape == (134, 3) and np.array_equal(big[:36], cols)
    assert len({tuple(c) for c in big[36:96]}) == 60  # the extra palette is distinct over a cycle
    cmap, norm = C.label_cmap_norm(35)
    k = np.arange(36)
    np.testing.assert_allclose(cmap(norm(k))[:, :3], cols)
    assert C.tick_labels([-0.1, -0.05, 0, 0.05, 0.1]) == ["-0.10", "-0.05", "0", "0.05", "0.10"]
    assert C.tick_labels([-1, 0, 1, 2, 3]) == ["-1", "0", "1", "2", "3"]


# --------------------------------------------------------------------------------------------- orientation, aspect
def test_orientation_is_radiological_for_ras():
    vol = np.zeros(SHAPE, np.float32)
    vol[SHAPE[0] - 1, SHAPE[1] - 1, 5] = 1.0  # patient right (max axis 0), anterior (max axis 1)
    shown = P.orient_slice(np.take(vol, 5, axis=2))  # axial, imshow(origin='lower'): row 0 at the bottom
    assert shown.shape == (SHAPE[1], SHAPE[0])
    assert shown[SHAPE[1] - 1, 0] == 1.0  # right → left column, anterior → top row
    neuro = P.orient_slice(np.take(vol, 5, axis=2), "neurological")
    assert neuro[SHAPE[1] - 1, SHAPE[0] - 1] == 1.0
    with pytest.raises(UserError):
        P.orient_slice(shown, "sideways")


def test_physical_aspect_with_anisotropic_spacing(pair):
    fixed, moving, fseg, mseg = pair
    spacing = (1.0, 2.0, 1.5)
    st = FigureStyle()
    for axis, (h, v) in {0: (1, 2), 1: (0, 2), 2: (0, 1)}.items():
        fig = comparison_figure(fixed, moving, _methods(1), fseg, mseg, axis=axis, spacing=spacing)
        ax = get_panel(fig, "deformed", "m0")
        assert ax.get_aspect() == pytest.approx(spacing[v] / spacing[h])
        fig.draw_without_rendering()
        w_in, h_in = fig.get_size_inches()
        bb = ax.get_position()
        phys = (SHAPE[v] * spacing[v]) / (SHAPE[h] * spacing[h])
        assert bb.width * w_in == pytest.approx(st.cell_width, rel=1e-3)  # every data cell is 3 in wide ...
        assert (bb.height * h_in) / (bb.width * w_in) == pytest.approx(phys, rel=1e-3)  # ... and physically tall


def test_scale_bar_length(pair):
    fixed, moving, fseg, mseg = pair
    fig = comparison_figure(fixed, moving, _methods(1), axis=2, spacing=(2.0, 1.0, 1.0), scale_bar_mm=20)
    ax = get_panel(fig, "deformed", "Fixed")
    (line,) = ax.lines
    x = line.get_xdata()
    assert abs(x[1] - x[0]) == pytest.approx(10.0)  # 20 mm / 2 mm per pixel
    assert any(t.get_text() == "20 mm" for t in ax.texts)


# --------------------------------------------------------------------------------------------- files
def test_save_figure_names_formats_and_overwrite(pair, tmp_path):
    fixed, moving, fseg, mseg = pair
    fig = comparison_figure(fixed, moving, _methods(1), fseg, mseg, axis=0, slice_index=9,
                            fixed_id="0004", moving_id="0236", rows=("deformed", "jacobian"))
    paths = save_figure(fig, tmp_path, formats=("png", "svg", "pdf"), dpi=20)
    assert [p.name for p in paths] == [f"f0004_m0236_axis0_slc010of40.{e}" for e in ("png", "svg", "pdf")]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[2].read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in paths[1].read_bytes()[:2000]
    with pytest.raises(UserError, match="overwrite"):
        save_figure(fig, tmp_path, formats=("png",), dpi=20)
    before = paths[0].stat().st_mtime_ns
    save_figure(fig, tmp_path, "0004", "0236", 0, 9, 40, formats="png", dpi=20, overwrite=True)
    assert paths[0].stat().st_mtime_ns >= before
    with pytest.raises(UserError):
        save_figure(fig, tmp_path, formats=("jpg",), dpi=20)


def test_import_is_light():
    code = ("import sys, napari_unireg.viz, napari_unireg.viz.cli; "
            "bad = [m for m in ('matplotlib', 'torch', 'napari') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# --------------------------------------------------------------------------------------------- CLI
def _write_case(tmp_path, pair):
    import nibabel as nib

    from napari_unireg.io import save_disp_l2r

    fixed, moving, fseg, mseg = pair
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    files = {}
    for role, arr in (("fixed", fixed), ("moving", moving), ("fixed_seg", fseg), ("moving_seg", mseg)):
        files[role] = tmp_path / f"UNIREG_{'0001' if 'fixed' in role else '0002'}_{role}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), files[role])
    methods = _methods(2)
    for name, u in methods.items():
        files[name] = save_disp_l2r(u, tmp_path / f"disp_{name}.nii.gz")
    return files, methods


def test_cli_figure_from_disp_files(pair, tmp_path):
    from napari_unireg.cli import main

    files, methods = _write_case(tmp_path, pair)
    out = tmp_path / "figs"
    argv = ["figure", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--fixed-seg", str(files["fixed_seg"]), "--moving-seg", str(files["moving_seg"]),
            "--disp", f"A={files['m0']}", "--disp", f"B={files['m1']}", "--axis", "0", "2",
            "--slice", "12", "--dpi", "20", "--format", "png", "pdf", "--out", str(out)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["f0001_m0002_axis0_slc012of40.pdf", "f0001_m0002_axis0_slc012of40.png",
                     "f0001_m0002_axis2_slc012of36.pdf", "f0001_m0002_axis2_slc012of36.png"]
    assert main(argv) == 2  # refuses to overwrite ...
    assert main([*argv, "--overwrite"]) == 0  # ... unless asked
    assert main([*argv[:-2], "--out", str(tmp_path / "x"), "--slice", "99"]) == 2
    bad = ["figure", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--disp", "nofile"]
    assert main(bad) == 2
    with pytest.raises(SystemExit):  # --models and --disp are exclusive (argparse error)
        main([*bad[:5], "--models", "a", "--disp", f"A={files['m0']}"])


def test_disp_to_canonical_inverts_the_writer():
    from napari_unireg.io import disp_to_original_orientation, volume_from_array
    from napari_unireg.viz.cli import disp_to_canonical

    lia = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -5], [0, -1, 0, 7], [0, 0, 0, 1]])
    img, _ = _blob((12, 14, 10))
    vol = volume_from_array(img, lia, kind="image")
    u = _field(vol.shape, seed=4)
    stored = disp_to_original_orientation(u, vol)
    assert stored.shape[1:] == img.shape
    np.testing.assert_array_equal(disp_to_canonical(stored, vol), u)


def test_subject_id():
    from napari_unireg.viz.cli import subject_id

    assert subject_id("/x/UNIREG_0001_0000.nii.gz") == "0001"
    assert subject_id("LUMIRMRI_3455_0000.nii") == "3455"
    assert subject_id("demo_fixed.nii.gz") == "demo_fixed"


def test_cli_figure_with_models_calls_the_engine(pair, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import napari_unireg.pipeline as engine
    from napari_unireg.cli import main

    files, methods = _write_case(tmp_path, pair)
    calls = []

    def fake_register(fixed, moving, fixed_seg=None, moving_seg=None, *, options=None, **kw):
        calls.append((options.model, options.device, fixed.shape, moving_seg is not None))
        return SimpleNamespace(model_name=f"net-{options.model}", disp_native=methods["m0"])

    monkeypatch.setattr(engine, "register_volumes", fake_register)
    out = tmp_path / "figs"
    argv = ["figure", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--moving-seg", str(files["moving_seg"]), "--models", "a,b", "--device", "cpu",
            "--axis", "1", "--dpi", "20", "--out", str(out)]
    assert main(argv) == 0
    assert calls == [("a", "cpu", SHAPE, True), ("b", "cpu", SHAPE, True)]
    assert [p.name for p in out.iterdir()] == [f"f0001_m0002_axis1_slc{SHAPE[1] // 2 + 1:03d}of{SHAPE[1]}.png"]


def test_moving_on_another_grid_is_resampled_by_world_coordinates():
    from napari_unireg.io import volume_from_array
    from napari_unireg.viz.cli import on_fixed_grid

    img, lab = _blob((12, 14, 10))
    fixed = volume_from_array(img, np.eye(4), kind="image")
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # moving voxel i sits at world x = i + 2
    moving = volume_from_array(img, shifted, kind="image")
    out = on_fixed_grid(moving, fixed, order=1)
    np.testing.assert_allclose(out[2:], img[:-2], atol=1e-6)  # fixed voxel p sees moving voxel p − 2
    assert np.all(out[:2] == 0)
    assert on_fixed_grid(fixed, fixed, order=1) is fixed.data
    seg = volume_from_array(lab, shifted, kind="label")
    assert on_fixed_grid(seg, fixed, order=0).dtype == seg.data.dtype
