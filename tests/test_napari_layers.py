"""Pure parts of the napari front end: layer data, hover read-out, result tuples, metrics tables."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unireg._napari import layers as L
from napari_unireg._napari import results
from napari_unireg._napari.metrics_widget import label_table, summary_table, to_text, write_csv
from napari_unireg._napari.ortho_views import plane_layout
from napari_unireg._napari.runs import RunStore
from napari_unireg._napari.status import append_to_status, readout
from napari_unireg.pipeline import RegistrationResult

SHAPE = (16, 18, 14)


def affine_field(shape, M, c=None):
    """Voxel displacement of p -> M (p - c) + c, i.e. u = (M - I)(p - c)."""
    p = np.indices(shape).astype(np.float64)
    c = np.array([(n - 1) / 2 for n in shape]) if c is None else np.asarray(c)
    q = p - c[:, None, None, None]
    return np.einsum("ij,j...->i...", M - np.eye(3), q).astype(np.float32)


def fake_run(store=None, M=None, spacing=(1.0, 1.0, 1.0), seg=True, model="toy"):
    from napari_unireg.core.metrics import jacobian_determinant

    M = np.diag([1.1, 0.9, 1.0]) if M is None else M
    disp = affine_field(SHAPE, M)
    rng = np.random.default_rng(0)
    fixed = rng.random(SHAPE).astype(np.float32)
    warped = L.warp_array(fixed, disp)
    fseg = (np.indices(SHAPE)[0] // 6 + 1).astype(np.uint8) if seg else None
    wseg = L.warp_array(fseg, disp, labels=True) if seg else None
    metrics = {"dice": 0.8, "dice_before": 0.6, "hd95": 1.5, "sdlogj": 0.01, "ndv": 0.0, "folded_pct": 0.0,
               "dice_per_label": {1: 0.9, 2: 0.8, 3: 0.7}, "dice_before_per_label": {1: 0.7, 2: 0.6, 3: 0.5}}
    res = RegistrationResult(disp_model=disp, disp_native=disp, warped=warped, jacobian=jacobian_determinant(disp),
                             metrics=metrics, warped_seg=wseg, model_name=model, device="cpu",
                             seconds={"total": 1.25})
    A = np.diag([*spacing, 1.0])
    A[:3, 3] = (-8.0, -9.0, -7.0)
    store = RunStore() if store is None else store
    return store.add(fixed_name="fix", moving_name="mov", model=model, result=res, affine=A, fixed=fixed,
                     fixed_seg=fseg, fixed_seg_name="fseg", moving_seg_name="mseg",
                     label_names={1: "one", 2: "two"}, moving=fixed, moving_affine=A, moving_seg=fseg)


def test_grid_volume_lines_in_plane():
    g = L.grid_volume((17, 17, 5), spacing=8, width=1, plane_axis=2)
    assert g.shape == (17, 17, 5)
    # lines at 0, 8, 16 along axes 0 and 1, constant along the plane axis
    assert g[8, 3, 0] == 1 and g[3, 8, 4] == 1 and g[3, 3, 2] == 0
    np.testing.assert_array_equal(g[..., 0], g[..., 4])
    with pytest.raises(ValueError):
        L.grid_volume((8, 8, 8), spacing=4, width=4)


def test_warped_grids_identity_and_shift():
    disp = np.zeros((3, *SHAPE), np.float32)
    grids = L.warped_grids(disp, spacing=4)
    assert [g.dtype for g in grids] == [np.uint8] * 3
    np.testing.assert_array_equal(grids[2], (L.grid_volume(SHAPE, 4, 1, 2) * 255).astype(np.uint8))
    disp[0] = 1.0  # pull by one voxel along axis 0: lines move to 3, 7, ... (p + 1 on a line)
    shifted = L.warped_grids(disp, spacing=4)[2]
    assert shifted[3, 1, 0] == 255 and shifted[4, 1, 0] == 0


def test_checkerboard_and_difference():
    a = np.zeros(SHAPE, np.float32)
    a[::2] = 1.0
    b = np.ones(SHAPE, np.float32) * 5
    b[0, 0, 0] = 0
    cb = L.checkerboard(a, b, tile=4)
    assert cb[0, 0, 0] == L.robust_normalize(a)[0, 0, 0]
    assert cb[4, 0, 0] == L.robust_normalize(b)[4, 0, 0]
    d = L.difference(a, a)
    assert np.abs(d).max() == 0
    with pytest.raises(ValueError):
        L.difference(a, a[:-1])


def test_displacement_mm_and_folding():
    disp = np.zeros((3, 2, 2, 2), np.float32)
    disp[0] = 2.0
    disp[2] = 1.0
    A = np.diag([1.5, 1.0, 3.0, 1.0])
    mm = L.displacement_mm(disp, A)
    np.testing.assert_allclose(mm[:, 0, 0, 0], (3.0, 0.0, 3.0))
    np.testing.assert_allclose(L.displacement_magnitude_mm(disp, A), np.sqrt(18.0))
    jac = np.array([[[1.0, 0.0], [-0.5, 2.0]]])
    np.testing.assert_array_equal(L.folding_mask(jac), [[[0, 1], [1, 0]]])


def test_resample_to_grid():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    A = np.eye(4)
    assert L.resample_to_grid(data, A, data.shape, A) is data
    B = A.copy()
    B[0, 3] = 1.0  # target grid starts one voxel further along axis 0
    out = L.resample_to_grid(data, A, (3, 5, 6), B)
    np.testing.assert_allclose(out, data[1:])


def test_readout_vector_in_mm_and_jacobian():
    disp = np.zeros((3, *SHAPE), np.float32)
    disp[1, 3, 4, 5] = 2.0
    jac = np.ones(SHAPE)
    jac[3, 4, 5] = 0.5
    A = np.diag([2.0, 1.5, 1.0, 1.0])
    A[:3, 3] = (10.0, 20.0, 30.0)
    world = A[:3, :3] @ np.array([3, 4, 5]) + A[:3, 3] + 0.2  # near voxel (3, 4, 5)
    r = readout(world, disp, A, jac)
    assert r.voxel == (3, 4, 5)
    np.testing.assert_allclose(r.u_mm, (0.0, 3.0, 0.0))
    assert r.jacobian == 0.5
    assert "J=0.500" in r.text() and "|u|=3.00 mm" in r.text()
    assert readout((-100.0, 0.0, 0.0), disp, A, jac) is None
    assert append_to_status("x", "u") == "x  ‖  u"
    assert append_to_status({"coordinates": "c"}, "u")["coordinates"].endswith("u")
    assert append_to_status("x  ‖  u", "u") == "x  ‖  u"


def test_plane_layouts_radiological_and_neurological():
    ax = plane_layout(2, radiological=True)
    assert ax.order == (2, 1, 0) and ax.orientation2d == ("up", "left")
    assert (ax.top, ax.bottom, ax.left, ax.right) == ("A", "P", "R", "L")
    cor = plane_layout(1, radiological=False)
    assert cor.order == (1, 2, 0) and (cor.top, cor.left, cor.right) == ("S", "L", "R")
    sag = plane_layout(0)
    assert sag.order == (0, 2, 1) and (sag.top, sag.bottom, sag.left, sag.right) == ("S", "I", "A", "P")


def test_result_tuples_have_right_values_for_affine_field():
    M = np.array([[1.1, 0.05, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 1.2]])
    run = fake_run(M=M, spacing=(2.0, 1.0, 1.0))
    assert run.layer_name("warped") == "warped [mov→fix, toy]"
    [(jac, kw, t)] = results.build(run, "jacobian")
    assert t == "image" and kw["contrast_limits"] == L.JACOBIAN_RANGE
    # blue-white-red, transparent at J = 1 (the middle of the range), opaque blue at J = -1 and red at J = 3
    cm = kw["colormap"]
    mid = len(cm["controls"]) // 2
    assert cm["colors"][mid, 3] < 0.05 and np.allclose(cm["colors"][mid, :3], 1.0, atol=0.01)
    np.testing.assert_allclose(cm["colors"][0], [0, 0, 1, 1])
    np.testing.assert_allclose(cm["colors"][-1], [1, 0, 0, 1])
    np.testing.assert_allclose(jac[2:-2, 2:-2, 2:-2], np.linalg.det(M), rtol=1e-5)
    [(mag, kw, _)] = results.build(run, "magnitude")
    p = np.array([0, 0, 0]) - np.array([(n - 1) / 2 for n in SHAPE])
    expected = np.linalg.norm(np.diag([2.0, 1.0, 1.0]) @ (M - np.eye(3)) @ p)
    np.testing.assert_allclose(mag[0, 0, 0], expected, rtol=1e-5)
    assert kw["metadata"]["unireg"]["displacement"]["disp"] is run.result.disp_native
    [(fold, kw, t)] = results.build(run, "folding")
    assert t == "labels" and fold.max() == 0
    contours = results.build(run, "contours")
    assert [len(kw["metadata"]["unireg"]["per_axis"]) for _, kw, _ in contours] == [3, 3]
    np.testing.assert_array_equal(contours[0][0], L.label_outlines(run.fixed_seg)[2])
    [(grid, kw, _)] = results.build(run, "grid", grid_spacing=4)
    assert len(kw["metadata"]["unireg"]["per_axis"]) == 3 and grid.dtype == np.uint8
    for kind in results.available_kinds(run):
        for data, kw, _ in results.build(run, kind):
            assert data.shape == SHAPE, kind
            np.testing.assert_array_equal(kw["affine"], run.affine)
            assert kw["metadata"]["unireg"]["run"] == run.id


def test_label_outlines_one_voxel_per_boundary():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[3:9, 3:9, 3:9] = 1
    lab[3:9, 6:9, 3:9] = 2  # two labels touching inside the box
    outlines = L.label_outlines(lab)
    for plane_axis in range(3):
        o = np.moveaxis(outlines[plane_axis], plane_axis, 0)
        m = np.moveaxis(lab, plane_axis, 0)
        for k in range(12):
            sl, out = m[k], o[k]
            if np.all(sl == sl[0, 0]):
                assert not out.any()  # a boundary parallel to the slice fills nothing
                continue
            # every in-plane boundary between 4-neighbours is drawn on at least one side ...
            for ax in (0, 1):
                a, b = np.take(sl, range(11), axis=ax), np.take(sl, range(1, 12), axis=ax)
                oa, ob = np.take(out, range(11), axis=ax), np.take(out, range(1, 12), axis=ax)
                assert np.all((oa | ob)[a != b])
            # ... and only on one: no voxel is marked whose 4-neighbourhood holds a single label
            from scipy.ndimage import maximum_filter, minimum_filter

            fp = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
            uniform = maximum_filter(sl, footprint=fp, mode="nearest") == minimum_filter(
                sl, footprint=fp, mode="nearest"
            )
            assert not np.any(out[uniform])
            # one voxel thick: the line between labels 1 and 2 is a single row of marks
            if plane_axis != 1 and 3 <= k < 9:
                line = np.moveaxis(out, 0 if plane_axis == 0 else 1, 0)[:, 4:8]  # rows: y
                assert line[5].all() and not line[4].any() and not line[6].any()


def test_runs_store_suffix_and_tables(tmp_path):
    store = RunStore()
    r1 = fake_run(store)
    r2 = fake_run(store)
    r3 = fake_run(store, model="other")
    assert r2.tag.endswith("#2") and r1.tag == "mov→fix, toy"
    header, rows = summary_table([r1, r2, r3])
    assert header == ["metric", "toy", "toy #2", "other"]
    by = {row[0]: row[1:] for row in rows}
    assert by["Dice after (mean)"] == ["0.8000"] * 3
    assert by["time (s)"][0] == "1.2" or by["time (s)"][0] == "1.3"
    h2, rows2 = label_table([r1, r3])
    assert h2 == ["label", "name", "before", "after toy", "after other"]
    assert rows2[0][:3] == ["1", "one", "0.7000"]
    text = to_text([(header, rows)])
    assert text.splitlines()[0] == "metric\ttoy\ttoy #2\tother"
    path = write_csv(str(tmp_path / "m.csv"), [(header, rows), (h2, rows2)])
    assert "Dice before (mean)" in open(path).read()
    assert by["weights"] == ["trained"] * 3  # no facts of which weights ran (the classical method has none)
    r1.metrics.update(resolution="half", weights_resolution="half")
    r3.metrics.update(resolution="half", weights_resolution="full")
    by = {row[0]: row[1:] for row in summary_table([r1, r3])[1]}
    assert by["weights"] == ["trained at 2 mm", "trained at 1 mm, run at 2 mm"]
    store.remove(r2)
    assert len(store) == 2


@pytest.mark.parametrize("spacing,width", [(8, 1), (5, 2)])
def test_warped_grids_equal_scipy_trilinear_pull_of_the_grid(spacing, width):
    # independent reference: scipy's order-1 map_coordinates of each grid volume at p + disp (mode 'nearest' =
    # border padding), on a smooth random field that also pulls from outside the volume
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(3)
    shape = (21, 26, 19)
    disp = np.stack([gaussian_filter(rng.standard_normal(shape), 2) * 12 for _ in range(3)]).astype(np.float32)
    pts = np.indices(shape, dtype=np.float64) + disp
    grids = L.warped_grids(disp, spacing=spacing, width=width)
    for plane_axis, got in enumerate(grids):
        ref = map_coordinates(L.grid_volume(shape, spacing, width, plane_axis).astype(np.float64), pts, order=1,
                              mode="nearest")
        assert got.dtype == np.uint8 and got.shape == shape
        assert np.abs(got.astype(int) - np.rint(ref * 255)).max() <= 1
        assert 0.05 < (ref > 0.5).mean() < 0.95  # the field really moved lines around (not a trivial case)
