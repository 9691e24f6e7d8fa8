"""Every bundled weight file loads without unpickling and its model card says how it was made and how it does."""

from __future__ import annotations

import pytest

from napari_unireg.models.registry import list_models, load_pretrained

BUNDLED = [m for m in list_models() if m.weights]


def test_registry_reports_weights_consistently():
    names = [m.name for m in list_models()]
    assert len(names) == len(set(names)) == 10


@pytest.mark.parametrize("info", BUNDLED, ids=[m.name for m in BUNDLED])
def test_bundled_model_card_and_weights(info):
    import torch

    model, card = load_pretrained(info.name)
    assert card["architecture"] == info.name
    training = card["training"]
    for key in ("command", "config", "data", "steps", "seed", "hardware", "wall_time_s"):
        assert training.get(key) not in (None, ""), key
    assert card["resolution"] in ("half", "full")
    for key in ("dice", "hd95", "sdlogj", "ndv"):
        assert isinstance(card["metrics"][key], float), key
    base = card["evaluation"]["baselines"]
    assert card["metrics"]["dice"] > base["affine"]["dice"]  # far above zero displacement
    shape = (32, 32, 32)
    with torch.inference_mode():
        out = model(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    assert out.disp.shape == (1, 3, *shape) and torch.isfinite(out.disp).all()


def test_default_model_is_the_best_bundled_one():
    from napari_unireg.pipeline.models import CLASSICAL, default_model_name

    name = default_model_name()
    if not BUNDLED:
        assert name == CLASSICAL
        return
    best = max(BUNDLED, key=lambda m: m.card["metrics"]["dice"])
    assert name == best.name


@pytest.mark.parametrize("info", BUNDLED, ids=[m.name for m in BUNDLED])
def test_register_reproduces_the_card(info, shared_data, tmp_path):
    """`unireg register` on validation pair 0001←0002 gives the card's per-pair numbers (network alone)."""
    import json

    from napari_unireg.cli import main

    run = next(r for r in info.card["evaluation"]["runs"] if r["io_steps"] == 0)
    row = next(r for r in run["per_pair"] if r["pair"] == "0001_0002")
    img, lab = shared_data / "imagesTr", shared_data / "labelsTr"
    out = tmp_path / "out"
    rc = main(["register", str(img / "UNIREG_0001_0000.nii.gz"), str(img / "UNIREG_0002_0000.nii.gz"),
               "--fixed-seg", str(lab / "UNIREG_0001_0000.nii.gz"), "--moving-seg", str(lab / "UNIREG_0002_0000.nii.gz"),
               "--model", info.name, "--device", "cpu", "--prealign", "none", "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice"] == pytest.approx(row["dice"], abs=2e-3)
    assert metrics["hd95"] == pytest.approx(row["hd95"], abs=0.05)
    assert metrics["sdlogj"] == pytest.approx(row["sdlogj"], abs=2e-3)
    assert metrics["ndv"] == pytest.approx(row["ndv"], abs=0.01)
