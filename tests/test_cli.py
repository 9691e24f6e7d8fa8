"""The `unireg` command line: help, models, end-to-end register on small volumes, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_unireg.cli import main

from conftest import smooth_blob_volume

SHAPE = (40, 44, 36)
GRID = ["--grid", "32", "48", "32"]


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """A small fixed/moving pair with label maps: the moving blob is shifted by 2 voxels along axis 0."""
    fixed = smooth_blob_volume(SHAPE, seed=1)
    fixed[fixed < 0.35] = 0
    moving = np.roll(fixed, 2, axis=0)
    fseg = (fixed > 0.55).astype(np.uint8) + (fixed > 0.7).astype(np.uint8)
    mseg = np.roll(fseg, 2, axis=0)
    return {
        "fixed": _save(tmp_path / "fixed.nii.gz", fixed),
        "moving": _save(tmp_path / "moving.nii.gz", moving),
        "fseg": _save(tmp_path / "fseg.nii.gz", fseg),
        "mseg": _save(tmp_path / "mseg.nii.gz", mseg),
    }


def test_help_of_every_subcommand(capsys):
    for sub in ([], ["register"], ["models"], ["demo"]):
        with pytest.raises(SystemExit) as exc:
            main([*sub, "--help"])
        assert exc.value.code == 0
    assert "register" in capsys.readouterr().out


def test_help_does_not_import_torch_or_napari():
    code = "import sys; from napari_unireg.cli import build_parser; build_parser(); print('torch' in sys.modules, 'napari' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_models_json_lists_every_model_with_exact_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    expected = {
        "dp-conv-mf": 2_854_079,
        "dp-conv-mfc": 3_168_575,
        "dp-conv-c": 1_993_023,
        "dp-convic-mf": 2_854_079,
        "dp-convic-c": 2_307_519,
        "dp-vfa": 791_104,
    }
    for name, total in expected.items():
        assert rows[name]["params_total"] == total
        assert rows[name]["params_encoder"] == 507_504
        assert rows[name]["params_encoder"] + rows[name]["params_decoder"] == total
        assert isinstance(rows[name]["weights"], bool)
    assert {"voxelmorph", "vfa", "sitreg", "transmorph"} <= set(rows)
    assert len(rows) == 10


def test_register_end_to_end_classical(pair, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["register", pair["fixed"], pair["moving"], "--fixed-seg", pair["fseg"], "--moving-seg", pair["mseg"],
               "--model", "classical", "--prealign", "none", "--out", str(out), "--quiet", *GRID])
    assert rc == 0, capsys.readouterr().err
    for name in ("warped.nii.gz", "disp.nii.gz", "disp_itk.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz",
                 "metrics.json", "run.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice"] > metrics["dice_before"] + 0.05
    assert metrics["model"] == "classical" and metrics["device"] == "cpu"
    disp = nib.load(out / "disp.nii.gz").get_fdata()
    assert disp.shape == (*SHAPE, 3)
    # The blob moved +2 voxels along axis 0: the pull field inside the blob points that way.
    fixed = nib.load(pair["fixed"]).get_fdata()
    assert np.median(disp[..., 0][fixed > 0.5]) > 1.0
    assert nib.load(out / "warped.nii.gz").shape == SHAPE


def test_register_refuses_to_overwrite(pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("precious")
    rc = main(["register", pair["fixed"], pair["moving"], "--model", "classical", "--out", str(out), "--quiet"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "precious"


def _bad(tmp_path, kind):
    good = smooth_blob_volume(SHAPE)
    if kind == "missing":
        return str(tmp_path / "nope.nii.gz")
    if kind == "not_nifti":
        p = tmp_path / "x.nii.gz"
        p.write_bytes(b"this is not a nifti file")
        return str(p)
    if kind == "2d":
        return _save(tmp_path / "a.nii.gz", good[:, :, 0])
    if kind == "4d":
        return _save(tmp_path / "a.nii.gz", np.stack([good, good], -1))
    if kind == "nan":
        g = good.copy()
        g[3, 3, 3] = np.nan
        return _save(tmp_path / "a.nii.gz", g)
    if kind == "constant":
        return _save(tmp_path / "a.nii.gz", np.ones(SHAPE, np.float32))
    if kind == "labels":
        return _save(tmp_path / "a.nii.gz", (good > 0.5).astype(np.uint8) * 3)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "not found"),
        ("not_nifti", "nii"),
        ("2d", "3D"),
        ("4d", "3D"),
        ("nan", "NaN"),
        ("constant", "constant"),
        ("labels", "label"),
    ],
)
def test_bad_moving_image_gives_one_line_error(pair, tmp_path, capsys, kind, message):
    rc = main(["register", pair["fixed"], _bad(tmp_path, kind), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message.lower() in err.lower()
    assert not (tmp_path / "o").exists()


def test_image_given_as_labels(pair, tmp_path, capsys):
    rc = main(["register", pair["fixed"], pair["moving"], "--moving-seg", pair["moving"], "--out", str(tmp_path / "o")])
    assert rc == 2 and "image" in capsys.readouterr().err


def test_unknown_model_and_absent_cuda(pair, tmp_path, capsys):
    import torch

    rc = main(["register", pair["fixed"], pair["moving"], "--model", "no-such-model", "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown model" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = main(["register", pair["fixed"], pair["moving"], "--device", "cuda", "--out", str(tmp_path / "o")])
        assert rc == 2 and "CUDA is not available" in capsys.readouterr().err


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "napari_unireg.cli", "register", "a.nii", "b.nii"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not found" in proc.stderr


def test_progress_without_a_terminal_is_one_line_per_stage(capsys):
    from napari_unireg.cli.register import _progress_printer

    progress, close = _progress_printer(quiet=False)  # pytest's captured stderr is not a TTY
    for stage, frac in [("load", 0.0), ("load", 1.0), ("prealign", 0.3), ("prealign", 0.9), ("inference", 0.5)]:
        progress(stage, frac)
    close()
    assert capsys.readouterr().err.splitlines() == ["load ...", "prealign ...", "inference ..."]


@pytest.mark.parametrize(
    "option, message",
    [
        (["--grid", "0", "0", "0"], "model grid"),
        (["--grid", "7", "7", "7"], "model grid"),
        (["--grid", "160", "224", "196"], "multiple of 8"),
        (["--io-steps", "-1"], "refinement steps"),
        (["--model", "no-such-model"], "unknown model"),
        (["--checkpoint", "missing.safetensors"], "unknown model"),
        (["--device", "tpu"], "unknown device"),
        (["--outputs", "warped,nonsense"], "unknown output"),
    ],
)
def test_every_option_is_checked_before_any_image_is_read(tmp_path, capsys, option, message):
    """The images do not exist: an error about them would mean they were read before the options were checked."""
    rc = main(["register", str(tmp_path / "no_fixed.nii.gz"), str(tmp_path / "no_moving.nii.gz"), *option,
               "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "no_fixed" not in err, err
    assert not (tmp_path / "o").exists()


def test_outputs_writes_only_what_is_asked(pair, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["register", pair["fixed"], pair["moving"], "--moving-seg", pair["mseg"], "--model", "classical",
               "--prealign", "none", "--outputs", "warped,disp", "--out", str(out), "--quiet", *GRID])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["disp.nii.gz", "run.json", "warped.nii.gz"]
    assert nib.load(out / "disp.nii.gz").shape == (*SHAPE, 3)


def test_disp_npz_is_the_learn2reg_submission_copy_of_disp(pair, tmp_path, capsys):
    """``--outputs disp,disp_npz``: disp.npz read the way the Learn2Reg evaluation reads it (``arr_0``, cast to
    float32) is disp.nii.gz channel-first, within float16 rounding; it is not written by default."""
    out = tmp_path / "out"
    rc = main(["register", pair["fixed"], pair["moving"], "--model", "classical", "--prealign", "none",
               "--outputs", "disp,disp_npz", "--out", str(out), "--quiet", *GRID])
    assert rc == 0, capsys.readouterr().err
    with np.load(out / "disp.npz") as npz:
        assert list(npz.keys()) == ["arr_0"] and npz["arr_0"].dtype == np.float16
        sub = npz["arr_0"].astype("float32")
    ref = np.moveaxis(np.asarray(nib.load(out / "disp.nii.gz").dataobj, dtype=np.float32), -1, 0)
    assert sub.shape == (3, *SHAPE) and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(sub, ref, atol=np.abs(ref).max() * 2**-10)
    default = tmp_path / "default"
    assert main(["register", pair["fixed"], pair["moving"], "--model", "classical", "--prealign", "none",
                 "--out", str(default), "--quiet", *GRID]) == 0
    assert not (default / "disp.npz").exists() and (default / "disp.nii.gz").exists()


def test_contrast_option_reaches_the_engine_and_a_bad_one_is_refused(pair, tmp_path, capsys):
    from napari_unireg.cli import build_parser
    from napari_unireg.cli.register import options_from_args

    args = build_parser().parse_args(["register", pair["fixed"], pair["moving"], "--contrast", "standardize"])
    assert options_from_args(args).contrast == "standardize"
    assert options_from_args(build_parser().parse_args(["register", pair["fixed"], pair["moving"]])).contrast == "scale"
    with pytest.raises(SystemExit) as exc:
        main(["register", pair["fixed"], pair["moving"], "--contrast", "bright", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--contrast" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
