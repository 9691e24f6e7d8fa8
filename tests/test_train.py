"""Training module: config, data/pair sampling, augmentation/synthesis, one step, exact resume, DDP (gloo)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import smooth_blob_volume

from napari_unireg.errors import UserError
from napari_unireg.train import config as tc
from napari_unireg.train.data import PairBatchSampler, PairPlan, discover, subject_id

TINY = {"enc_channels": [4, 4, 4], "dec_channels": [4, 4, 4]}
SHAPE = (16, 16, 16)


# ----------------------------------------------------------------------------------------------- fixtures
def _write_dataset(root: Path, n: int = 4, shape=SHAPE, labels: bool = True) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    items = []
    for i in range(n):
        v = smooth_blob_volume(shape, seed=i)
        blocks = np.random.default_rng(i).integers(0, 3, size=[n_ // 4 for n_ in shape])
        lab = np.kron(blocks, np.ones((4, 4, 4), dtype=np.int64)).astype(np.uint8)  # piecewise constant
        v[v < 0.1] = 0
        name = f"T_{i + 1:04d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(v, np.eye(4)), root / "imagesTr" / name)
        item = {"image": f"./imagesTr/{name}"}
        if labels:
            nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / name)
            item["label"] = f"./labelsTr/{name}"
        items.append(item)
    meta = {"training": items, "registration_val": [{"fixed": items[0]["image"], "moving": items[1]["image"]}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "dataset.json"


@pytest.fixture
def dataset(tmp_path) -> Path:
    return _write_dataset(tmp_path / "ds")


def _cfg(ds: Path, *extra: str, model: str = "dp-conv-c"):
    return tc.load_config(
        None,
        [
            ("model", model),
            ("model_config", dict(TINY)),
            ("data.source", str(ds)),
            ("data.grid_shape", list(SHAPE)),
            ("data.num_workers", 0),
            ("device", "cpu"),
            ("threads", 1),
            ("optim.pairs_per_epoch", 2),
            ("val.every_epochs", 0),
            ("log.progress", False),
            *extra,
        ],
    )


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- config
def test_default_yaml_matches_dataclass_defaults():
    assert tc.config_diff(tc.load_config(), tc.Config()) == []


def test_overrides_types_and_unknown_keys():
    cfg = tc.load_config(None, ["optim.lr=1e-4", "augment.enabled=true", "synth.label_maps=[/a, /b]", "steps=12"])
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.augment.enabled is True
    assert cfg.synth.label_maps == ["/a", "/b"] and cfg.steps == 12
    with pytest.raises(UserError, match="unknown key 'optim.lrr'"):
        tc.load_config(None, ["optim.lrr=1"])
    with pytest.raises(UserError, match="optim.lr must be a number"):
        tc.load_config(None, ["optim.lr=fast"])
    with pytest.raises(UserError, match="key=value"):
        tc.parse_override("optim.lr")


def test_config_yaml_roundtrip(tmp_path):
    cfg = tc.load_config(None, ["optim.lr=3e-4", "data.resolution=half"])
    tc.save_config(cfg, tmp_path / "c.yaml")
    assert tc.config_diff(tc.load_config(tmp_path / "c.yaml"), cfg) == []


# ----------------------------------------------------------------------------------------------- data
def test_subject_id():
    assert subject_id("/x/UNIREG_0001_0000.nii.gz") == "0001"
    assert subject_id("LUMIRMRI_3455_0000.nii.gz") == "3455"
    assert subject_id("brain_a.nii") == "brain_a"


def test_pair_plan_excludes_validation_pairs_and_is_deterministic():
    excluded = {frozenset((0, 1)), frozenset((2, 3))}
    plan = PairPlan(5, excluded, seed=3)
    pairs = [plan(i) for i in range(400)]
    assert all(p.a != p.b for p in pairs)
    assert not any(frozenset((p.a, p.b)) in excluded for p in pairs)
    # each pass of 5 pairs visits every moving image once (shuffled pass, §9)
    for k in range(0, 400, 5):
        assert sorted(p.a for p in pairs[k : k + 5]) == [0, 1, 2, 3, 4]
    assert [plan(i) for i in range(50)] == [PairPlan(5, excluded, seed=3)(i) for i in range(50)]
    assert [plan(i) for i in range(50)] != [PairPlan(5, excluded, seed=4)(i) for i in range(50)]


def test_pair_plan_synthetic_fraction():
    plan = PairPlan(4, set(), seed=0, synth_prob=0.5, n_maps=3, same_map_prob=0.0)
    specs = [plan(i) for i in range(400)]
    synth = [s for s in specs if s.kind == "synth"]
    assert 150 < len(synth) < 250
    assert all(s.a != s.b and 0 <= s.a < 3 and 0 <= s.b < 3 for s in synth)


def test_batch_sampler_splits_ranks_and_resumes():
    r0, r1 = iter(PairBatchSampler(0, 2, 0, 2)), iter(PairBatchSampler(0, 2, 1, 2))
    a = [i for _ in range(3) for i in next(r0)]
    b = [i for _ in range(3) for i in next(r1)]
    assert not set(a) & set(b) and sorted(a + b) == list(range(12))
    again = iter(PairBatchSampler(1, 2, 0, 2))
    assert next(again) == a[2:4]


def test_discover_dataset_json_and_val_pairs(dataset):
    tset = discover(tc.DataConfig(source=str(dataset)))
    assert len(tset.entries) == 4 and all(e.label for e in tset.entries)
    assert [(f.id, m.id) for f, m in tset.val_pairs] == [("0001", "0002")]
    assert tset.excluded == {frozenset((0, 1))}
    strict = discover(tc.DataConfig(source=str(dataset), exclude_val_subjects=True))
    assert [e.id for e in strict.entries] == ["0003", "0004"] and strict.dropped == ["0001", "0002"]


def test_discover_folder_with_csv_pairs(dataset, tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("fixed,moving\n0003,0004\n")
    tset = discover(
        tc.DataConfig(
            source=str(dataset.parent / "imagesTr"), labels=str(dataset.parent / "labelsTr"), val_pairs=str(csv)
        )
    )
    assert len(tset.entries) == 4 and tset.entries[2].label.endswith("T_0003_0000.nii.gz")
    assert tset.excluded == {frozenset((2, 3))}
    from_json = discover(tc.DataConfig(source=str(dataset.parent / "imagesTr"), val_pairs=str(dataset)))
    assert [(f.id, m.id) for f, m in from_json.val_pairs] == [("0001", "0002")]
    assert from_json.excluded == {frozenset((0, 1))}


def test_missing_files_and_bad_dataset_raise_user_errors(dataset, tmp_path):
    (dataset.parent / "labelsTr" / "T_0002_0000.nii.gz").unlink()
    with pytest.raises(UserError, match="missing.*T_0002_0000"):
        discover(tc.DataConfig(source=str(dataset)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(UserError, match="no 'training' list"):
        discover(tc.DataConfig(source=str(bad)))
    with pytest.raises(UserError, match="not found"):
        discover(tc.DataConfig(source=str(tmp_path / "nope.json")))
    csv = tmp_path / "p.csv"
    csv.write_text("0001,9999\n")
    with pytest.raises(UserError, match="9999"):
        discover(tc.DataConfig(source=str(dataset.parent / "imagesTr"), val_pairs=str(csv)))


def test_pair_dataset_half_resolution(dataset):
    from napari_unireg.train.data import PairDataset, VolumeLoader

    cfg = _cfg(dataset, ("data.resolution", "half"))
    tset = discover(cfg.data)
    ds = PairDataset(tset, cfg, PairPlan(4, tset.excluded), VolumeLoader(SHAPE, 2, cache_size=2), want_labels=True)
    item = ds[0]
    assert item["moving"].shape == (1, 8, 8, 8) and item["moving_label"].shape == (1, 8, 8, 8)
    from napari_unireg.core.intensity import normalize_intensity

    full = normalize_intensity(nib.load(tset.entries[ds.plan(0).a].image).get_fdata(dtype=np.float32))
    expected = full.reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5))
    assert np.allclose(item["moving"][0].numpy(), expected, atol=1e-6)
    assert len(ds.loader._cache) <= 2


# ----------------------------------------------------------------------------------------------- augment / synth
def test_augment_pair_deterministic_and_background_kept():
    from scipy.ndimage import binary_dilation

    from napari_unireg.train.augment import augment_pair

    img = smooth_blob_volume(SHAPE, 1) * 0.8 + 0.2
    grid = np.indices(SHAPE) - 7.5
    img[(grid**2).sum(0) > 36] = 0  # a "brain" ball, background 0 like skull-stripped data
    cfg = tc.AugmentConfig(enabled=True, affine_prob=1, deform_prob=1, bias_prob=1, gamma_prob=1, noise_prob=1)
    pair = {"moving": img, "fixed": img, "moving_label": (img > 0).astype(np.int64), "fixed_label": None}
    a = augment_pair(pair, np.random.default_rng(5), cfg)
    b = augment_pair(pair, np.random.default_rng(5), cfg)
    assert np.array_equal(a["moving"], b["moving"]) and np.array_equal(a["moving_label"], b["moving_label"])
    assert not np.allclose(a["moving"], img) and not np.allclose(a["moving"], a["fixed"])
    assert a["moving"].min() >= 0 and a["moving"].max() <= 1
    # bias and noise stay inside the brain: the background is exactly 0 away from the (warped) brain
    outside = ~binary_dilation(a["moving_label"] > 0, np.ones((3, 3, 3)), iterations=2)
    assert outside.mean() > 0.2 and np.all(a["moving"][outside] == 0)


def test_synthesize_pair():
    from napari_unireg.train.synth import synthesize_pair

    lab = np.zeros(SHAPE, dtype=np.int16)
    lab[3:13, 3:13, 3:13] = 2  # white matter
    lab[5:11, 5:11, 5:11] = 3  # cortex
    lab[7:9, 7:9, 7:9] = 4  # ventricle
    lab[0:2] = 502  # extra-cerebral: painted 0
    cfg = tc.SynthConfig(prob=1.0, contrast="t1")
    out = synthesize_pair(lab, lab, np.random.default_rng(0), cfg)
    again = synthesize_pair(lab, lab, np.random.default_rng(0), cfg)
    assert np.array_equal(out["moving"], again["moving"])
    for side in ("moving", "fixed"):
        img, lab_out = out[side], out[f"{side}_label"]
        assert img.shape == SHAPE and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
        assert np.all(img[lab_out == 0] == 0) and img[lab_out > 0].mean() > 0.1
        assert set(np.unique(lab_out)) <= {0, 1, 2, 3}
    assert not np.allclose(out["moving"], out["fixed"])


# ----------------------------------------------------------------------------------------------- steps
def _tiny_step_problem():
    """A tiny dp-conv-c, its optimiser and a pair one voxel apart: ``(model, opt, moving, fixed)``."""
    from napari_unireg.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("dp-conv-c", **TINY)
    fixed = torch.from_numpy(smooth_blob_volume(SHAPE, 0))[None, None]
    moving = torch.roll(fixed, shifts=1, dims=2)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True), moving, fixed


def test_one_step_decreases_the_loss_on_a_fixed_pair():
    from napari_unireg.core.losses import registration_loss
    from napari_unireg.train.loop import train_step

    model, opt, moving, fixed = _tiny_step_problem()

    def loss():
        with torch.no_grad():
            return float(registration_loss(fixed, moving, model(moving, fixed), 1.0))

    before = loss()
    terms = train_step(model, opt, moving, fixed)
    assert terms["loss"] == pytest.approx(before, rel=1e-5) and terms["skipped"] == 0
    assert loss() < before


def test_loss_window_reaches_the_similarity_of_a_step():
    # the step's similarity term is the NCC of the window it is given, computed here independently from the model's
    # own output (lr 0: the weights, hence the output, do not change); an even window is refused before training
    from napari_unireg.core.losses import ncc_vfa
    from napari_unireg.core.sample import warp
    from napari_unireg.train.loop import _validate_cfg, train_step

    model, _, moving, fixed = _tiny_step_problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    with torch.no_grad():
        warped = warp(moving, model(moving, fixed).disp)
    sims = {w: train_step(model, opt, moving, fixed, window=w)["sim"] for w in (3, 9)}
    for w, sim in sims.items():
        assert sim == pytest.approx(float(ncc_vfa(fixed, warped, window=w)), rel=1e-5)
    assert abs(sims[3] - sims[9]) > 1e-3
    assert tc.load_config(overrides=["loss.window=5"]).loss.window == 5
    with pytest.raises(UserError, match="loss.window"):
        _validate_cfg(tc.load_config(overrides=["loss.window=4"]))


def test_full_resolution_loss_pools_the_input_and_brings_the_field_up():
    """loss.full_resolution: the network sees the average-pooled pair, its field is brought up to the full grid
    for the similarity (trilinear, pooled voxel i centred at full coordinate 2i + 0.5, values ×2: recomputed here
    with scipy), and the diffusion term stays on the network's own field."""
    from scipy.ndimage import map_coordinates

    from napari_unireg.core.losses import ncc_vfa
    from napari_unireg.core.sample import warp
    from napari_unireg.train.loop import _validate_cfg, train_step

    model, _, moving, fixed = _tiny_step_problem()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append([a.detach().clone() for a in args]))
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    terms = train_step(model, opt, moving, fixed, window=5, pool=2)
    pooled = [x[0, 0].numpy().reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5)) for x in (moving, fixed)]
    assert [tuple(a.shape[2:]) for a in seen[0]] == [(8, 8, 8)] * 2
    assert all(np.allclose(a[0, 0].numpy(), b, atol=1e-6) for a, b in zip(seen[0], pooled))
    with torch.no_grad():
        small = model(*seen[0]).disp[0].numpy()
    coords = np.meshgrid(*[(np.arange(16) - 0.5) / 2] * 3, indexing="ij")
    up = np.stack([2 * map_coordinates(c, coords, order=1, mode="nearest") for c in small])
    expected_sim = float(ncc_vfa(fixed, warp(moving, torch.from_numpy(up)[None]), window=5))
    expected_reg = np.mean([np.mean(np.diff(small, axis=a) ** 2) for a in (1, 2, 3)])
    assert terms["sim"] == pytest.approx(expected_sim, rel=1e-4)
    assert terms["reg"] == pytest.approx(expected_reg, rel=1e-4)
    with pytest.raises(UserError, match="loss.full_resolution"):
        _validate_cfg(tc.load_config(overrides=["loss.full_resolution=true"]))


def test_full_resolution_loss_run_paints_and_augments_on_the_full_grid(dataset, tmp_path, monkeypatch):
    """A half-resolution run with the similarity on the full grid: pairs (real, augmented and painted) reach the
    step at full resolution, the exported network is a half-resolution one."""
    from napari_unireg.models.checkpoint import read_card
    from napari_unireg.train import loop
    from napari_unireg.train.loop import train

    shapes = []
    real_step = loop.train_step

    def spy(model, opt, moving, fixed, **kw):
        shapes.append((tuple(moving.shape[2:]), kw["pool"]))
        return real_step(model, opt, moving, fixed, **kw)

    cfg = _cfg(dataset, ("steps", 4), ("data.resolution", "half"), ("loss.full_resolution", True),
               ("loss.window", 5), ("augment.enabled", True), ("synth.prob", 0.5), ("synth.use_dataset_labels", True),
               ("loss.dice_weight", 1.0), ("data.seed", 1), ("export.name", "net"))
    monkeypatch.setattr(loop, "train_step", spy)
    res = train(cfg, tmp_path / "run")
    assert res.step == 4 and shapes == [(SHAPE, 2)] * 4
    with open(tmp_path / "run" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["synthetic"] for r in rows} == {"0", "1"} and all(np.isfinite(float(r["loss"])) for r in rows)
    card = read_card(tmp_path / "run" / "net.safetensors")
    assert card["resolution"] == "half" and card["input_shape"] == [8, 8, 8]
    assert card["training"]["config"]["loss"]["full_resolution"] is True


def test_a_step_with_non_finite_gradients_is_skipped():
    from napari_unireg.train.loop import train_step

    model, opt, moving, fixed = _tiny_step_problem()
    weight = next(p for p in model.parameters() if p.ndim == 5)
    hook = weight.register_hook(lambda g: torch.full_like(g, float("nan")))  # what a faulty kernel returns
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms = train_step(model, opt, moving, fixed)
    assert terms["skipped"] == 1 and np.isfinite(terms["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update, no NaN weights
    assert all(p.grad is None for p in model.parameters())
    hook.remove()
    assert train_step(model, opt, moving, fixed)["skipped"] == 0
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_steps_directions_and_epochs(dataset):
    from napari_unireg.train.loop import plan_steps

    cfg = _cfg(dataset, ("optim.epochs", 10), ("optim.pairs_per_epoch", 4), ("val.every_epochs", 5))
    p = plan_steps(cfg, symmetric=False)
    assert (p.bidir, p.steps_per_pair, p.pairs_per_step, p.total_steps, p.val_every) == (True, 2, 1, 40, 20)
    q = plan_steps(cfg, symmetric=True, world=2)
    assert (q.bidir, q.steps_per_pair, q.pairs_per_step, q.total_steps) == (False, 1, 4, 10)


def test_symmetric_step_for_inverse_consistent_model(dataset, tmp_path):
    from napari_unireg.train.loop import train

    cfg = _cfg(dataset, ("steps", 2), model="dp-convic-c")
    res = train(cfg, tmp_path / "ic")
    rows = (tmp_path / "ic" / "log.csv").read_text().splitlines()
    assert res.step == 2 and len(rows) == 3
    card = json.loads((tmp_path / "ic" / "final.json").read_text())
    assert card["training"]["directions"] == "symmetric" and card["training"]["directed_pairs"] == 4


def test_synthetic_pairs_dice_loss_and_bf16_autocast(dataset, tmp_path):
    from napari_unireg.train.loop import train

    cfg = _cfg(
        dataset,
        ("steps", 4),
        ("amp", "bf16"),
        ("loss.dice_weight", 1.0),
        ("synth.prob", 0.5),
        ("synth.use_dataset_labels", True),
        ("data.seed", 1),
    )
    res = train(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert res.step == 4 and len(rows) == 4
    assert {r["synthetic"] for r in rows} == {"0", "1"}  # both real and synthetic pairs were drawn
    assert all(float(r["dice_loss"]) > 0 for r in rows)  # the Dice term ran on real and synthetic pairs
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert {r["skipped"] for r in rows} == {"0"}


def test_dice_on_synthetic_pairs_only_keeps_real_labels_out_of_the_loss(dataset, tmp_path):
    """loss.dice_pairs=synthetic: the real images' label maps (which may be the validation subjects') never
    reach the loss; the painted pairs carry their own label maps into the Dice term."""
    from napari_unireg.train.data import PairDataset, VolumeLoader
    from napari_unireg.train.loop import train

    extra = [("loss.dice_weight", 1.0), ("loss.dice_pairs", "synthetic"), ("synth.prob", 0.5)]
    extra += [("synth.use_dataset_labels", True), ("data.seed", 1)]
    cfg = _cfg(dataset, *extra)
    tset = discover(cfg.data, cfg.synth)
    plan = PairPlan(4, tset.excluded, seed=1, synth_prob=0.5, n_maps=len(tset.label_maps))
    ds = PairDataset(tset, cfg, plan, VolumeLoader(SHAPE, 1, cache_size=2), want_labels=True)
    items = [ds[i] for i in range(8)]
    assert {it["synthetic"] for it in items} == {True, False}
    for it in items:
        assert it["has_labels"] == it["synthetic"]
        assert int(it["moving_label"].max()) > 0 if it["synthetic"] else it["moving_label"].shape == (1, 1, 1, 1)

    train(_cfg(dataset, ("steps", 6), *extra), tmp_path / "run")
    with open(tmp_path / "run" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["synthetic"] for r in rows} == {"0", "1"}
    assert all((float(r["dice_loss"]) > 0) == (r["synthetic"] == "1") for r in rows)
    with pytest.raises(UserError, match="dice_pairs"):
        train(_cfg(dataset, ("steps", 1), ("loss.dice_pairs", "real")), tmp_path / "bad")


# ----------------------------------------------------------------------------------------------- resume
def _run(ds, out, steps, *, crash_at=None, resume=False, workers=0, ckpt_every=3):
    from napari_unireg.train.loop import train

    cfg = _cfg(
        ds,
        ("steps", steps),
        ("data.num_workers", workers),
        ("log.checkpoint_every", ckpt_every),
        ("augment.enabled", True),
    )

    def on_step(step, terms):
        if crash_at is not None and step == crash_at:
            raise RuntimeError("simulated crash")

    return train(cfg, out, resume=resume, on_step=on_step)


def test_resume_after_crash_reproduces_the_uninterrupted_run(dataset, tmp_path):
    ref = _run(dataset, tmp_path / "ref", 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(dataset, tmp_path / "run", 6, crash_at=5, workers=1)  # last checkpoint: step 3 (mid pair)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 3
    res = _run(dataset, tmp_path / "run", 6, resume=True, workers=1)
    assert res.step == 6
    assert _weights_equal(ref.model.state_dict(), res.model.state_dict())
    steps = [int(line.split(",")[0]) for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
    ref_loss = (tmp_path / "ref" / "log.csv").read_text().splitlines()[-1].split(",")[2]
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[-1].split(",")[2] == ref_loss


def test_stop_request_then_resume_to_more_steps(dataset, tmp_path):
    from napari_unireg.train.loop import train

    ref = _run(dataset, tmp_path / "ref", 4)
    cfg = _cfg(dataset, ("steps", 4), ("log.checkpoint_every", 100), ("augment.enabled", True))
    calls = []
    res = train(cfg, tmp_path / "run", should_stop=lambda: calls.append(1) or len(calls) >= 2)
    assert res.interrupted and res.step == 2 and not (tmp_path / "run" / "final.safetensors").exists()
    res = _run(dataset, tmp_path / "run", 4, resume=True, ckpt_every=100)
    assert _weights_equal(ref.model.state_dict(), res.model.state_dict())


def test_existing_run_needs_resume_and_bad_checkpoints_fail_clearly(dataset, tmp_path):
    from napari_unireg.train.loop import train

    out = tmp_path / "run"
    _run(dataset, out, 2)
    with pytest.raises(UserError, match="--resume"):
        train(_cfg(dataset, ("steps", 2)), out)
    # a changed architecture is refused
    with pytest.raises(UserError, match="differs from the saved run in model_config"):
        train(
            _cfg(
                dataset,
                ("steps", 4),
                ("augment.enabled", True),
                ("model_config", {"enc_channels": [4, 4, 8], "dec_channels": [4, 4, 4]}),
            ),
            out,
            resume=True,
        )
    # tensors that do not fit
    state = torch.load(out / "last.pt", weights_only=True)
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(7)
    torch.save(state, out / "last.pt")
    with pytest.raises(UserError, match="does not fit the model"):
        _run(dataset, out, 4, resume=True)
    # a corrupt file
    (out / "last.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt"):
        _run(dataset, out, 4, resume=True)


def test_checkpoint_holds_only_safe_types(dataset, tmp_path):
    _run(dataset, tmp_path / "run", 2)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # would raise on pickled objects
    assert state["format"].startswith("napari-unireg-train-state") and state["model_name"] == "dp-conv-c"
    assert {"torch", "numpy", "python"} <= set(state["rng"])


# ----------------------------------------------------------------------------------------------- export / init / CLI
def test_cli_run_writes_card_and_init_encoder(dataset, tmp_path):
    from napari_unireg.cli import build_parser
    from napari_unireg.models.registry import build_model
    from napari_unireg.train.checkpointing import init_from

    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(
        json.dumps(
            {
                "model_config": TINY,
                "data": {"grid_shape": list(SHAPE), "num_workers": 0},
                "optim": {"pairs_per_epoch": 2},
                "val": {"every_epochs": 1},
            }
        )
    )
    out = tmp_path / "run"
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(cfgfile),
            "--data",
            str(dataset),
            "--out",
            str(out),
            "--steps",
            "2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--quiet",
            "--set",
            "export.name=conv-c-tiny",
        ]
    )
    assert args.func(args) == 0
    card = json.loads((out / "conv-c-tiny.json").read_text())
    assert card["architecture"] == "dp-conv-c" and card["resolution"] == "full"
    assert card["metrics"]["dice"] is not None and card["metrics"]["sdlogj"] is not None
    t = card["training"]
    assert t["steps"] == 2 and t["seed"] == 0 and t["config"]["optim"]["lr"] == pytest.approx(1e-3)
    assert "unireg" in t["command"] and t["hardware"]["cpu"] and t["wall_time_s"] >= 0
    assert t["data"]["val_pairs"] == [["0001", "0002"]] and t["data"]["excluded_training_pairs"] == 1
    assert "(best" not in (out / "config.yaml").read_text()

    # --init-encoder: the encoder of the trained model, decoder tensors that fit
    other = build_model("dp-conv-mf", **TINY)
    info = init_from(other, str(out / "conv-c-tiny.safetensors"))
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    enc = [k for k in other.state_dict() if k.startswith("encoder.")]
    assert info["encoder_tensors"] == len(enc) > 0
    # the card names the exact weights it started from (hashlib on the file, not the code's own reading)
    assert info["sha256"] == hashlib.sha256((out / "conv-c-tiny.safetensors").read_bytes()).hexdigest()
    assert all(torch.allclose(other.state_dict()[k], trained[k].float(), atol=1e-3) for k in enc)
    with pytest.raises(UserError, match="compatible encoder"):
        init_from(
            build_model("dp-conv-c", enc_channels=[8, 8, 8], dec_channels=[4, 4, 4]),
            str(out / "conv-c-tiny.safetensors"),
        )


def test_cli_resume_uses_the_saved_config(dataset, tmp_path, capsys):
    from napari_unireg.cli import main

    out = str(tmp_path / "run")
    common = ["--device", "cpu", "--threads", "1", "--workers", "0", "--quiet"]
    tiny = [
        "--set",
        "model_config={enc_channels: [4, 4, 4], dec_channels: [4, 4, 4]}",
        "--set",
        "data.grid_shape=[16,16,16]",
    ]
    assert main(["train", "--data", str(dataset), "--out", out, "--steps", "2", *common, *tiny]) == 0
    assert main(["train", "--data", str(dataset), "--out", out, "--steps", "2", *common, *tiny]) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume needs neither --data nor the model settings: the run folder's config.yaml is used
    assert main(["train", "--out", out, "--resume", "--steps", "3", *common]) == 0
    assert torch.load(Path(out) / "last.pt", weights_only=True)["step"] == 3
    assert main(["train", "--out", out, "--resume", "--steps", "4", "--set", "optim.lr=0.1", *common]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cli_print_config_and_user_error(dataset, tmp_path, capsys):
    from napari_unireg.cli import main

    assert (
        main(
            ["train", "--out", str(tmp_path / "x"), "--data", str(dataset), "--print-config", "--set", "optim.lr=2e-4"]
        )
        == 0
    )
    assert "lr: 0.0002" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.json")]) == 2
    assert "training data not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, ds: str, out: str, result_dir: str, boxed: bool = False) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    from napari_unireg.train import loop

    seen, overrides = [], [("steps", 3), ("seed", 0)]
    if boxed:  # a 20 s box of fake clocks that differ per rank (1 s and 0.5 s per step): plans fall due apart
        now = [0.0]
        loop._clock = lambda: now[0]
        overrides = [("steps", 1000), ("seed", 0), ("optim.time_limit_s", 20.0), ("log.tensorboard", False)]

    def on_step(step, terms):
        seen.append(terms["loss"])
        if boxed:
            now[0] += 1.0 if rank == 0 else 0.5

    res = loop.train(_cfg(Path(ds), *overrides), out, on_step=on_step)
    torch.save({"model": res.model.state_dict(), "losses": seen}, Path(result_dir) / f"rank{rank}.pt")


def test_ddp_two_cpu_processes_hold_identical_weights(dataset, tmp_path):
    import torch.multiprocessing as mp

    res_dir = tmp_path / "res"
    res_dir.mkdir()
    mp.spawn(
        _ddp_worker, args=(2, _free_port(), str(dataset), str(tmp_path / "run"), str(res_dir)), nprocs=2, join=True
    )
    r0 = torch.load(res_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(res_dir / "rank1.pt", weights_only=True)
    assert _weights_equal(r0["model"], r1["model"])
    assert r0["losses"] != r1["losses"]  # the ranks trained on different pairs
    card = json.loads((tmp_path / "run" / "final.json").read_text())
    assert card["training"]["hardware"]["world_size"] == 2 and card["training"]["directed_pairs"] == 6


def test_ddp_time_plan_ranks_agree_when_their_clocks_differ(dataset, tmp_path):
    """Rank 0's re-plan falls due at steps 7 and 10, rank 1's (twice as fast) later: the ranks plan together
    (a plan on one rank alone would leave the other out of a collective and hang), from the slowest rank's fit."""
    import torch.multiprocessing as mp

    res_dir = tmp_path / "res"
    res_dir.mkdir()
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), str(dataset), str(tmp_path / "run"), str(res_dir), True),
                   nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the ranks of a time-boxed run did not finish (a collective one rank skipped?)")
    r0 = torch.load(res_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(res_dir / "rank1.pt", weights_only=True)
    # rank 0 plans 16 more steps after step 4 (clock 4 s of 20); rank 1 would fit 36: the run is 20 steps on both
    assert len(r0["losses"]) == len(r1["losses"]) == 20
    assert _weights_equal(r0["model"], r1["model"])
    assert json.loads((tmp_path / "run" / "final.json").read_text())["training"]["steps"] == 20


# ----------------------------------------------------------------------------------------------- real data (skips)
def test_development_data_plan(shared_data):
    tset = discover(
        tc.DataConfig(source=str(shared_data / "dataset.json")),
        tc.SynthConfig(prob=0.3, label_maps=[str(shared_data / "synthseg_labels")]),
    )
    assert len(tset.entries) == 14 and len(tset.val_pairs) == 6 and len(tset.excluded) == 6
    assert len(tset.label_maps) == 20
    plan = PairPlan(len(tset.entries), tset.excluded, 0, 0.3, len(tset.label_maps))
    real = [plan(i) for i in range(2000)]
    val = {frozenset((f.id, m.id)) for f, m in tset.val_pairs}
    assert not any(frozenset((tset.entries[p.a].id, tset.entries[p.b].id)) in val for p in real if p.kind == "real")


def test_learning_rate_warmup_and_schedule_in_the_log(dataset, tmp_path):
    from napari_unireg.train.loop import train

    train(
        _cfg(
            dataset,
            ("steps", 3),
            ("optim.warmup_steps", 2),
            ("optim.pairs_per_epoch", 1),
            ("optim.T_0", 2),
            ("optim.T_mult", 1),
        ),
        tmp_path / "run",
    )
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    lrs = [float(r.split(",")[6]) for r in rows]
    # §9: after step k the schedule is set at the position *before* that step (k-1 epochs here), so
    # step 1: warm-up 1/2 of 1e-3; step 2: epoch 0 (1e-3); step 3: epoch 1 of T_0 = 2, the cosine midpoint
    mid = 1e-5 + (1e-3 - 1e-5) * 0.5
    assert lrs == pytest.approx([0.5e-3, 1e-3, mid], rel=1e-4)


# ----------------------------------------------------------------------------------------------- time box
def test_time_box_plans_the_steps_that_fit_and_stops_in_time():
    from napari_unireg.train.loop import TIME_PLAN_STEPS, _TimeBox

    box = _TimeBox(20.0, t_start=100.0, plan_steps=True)
    box.record(105.0)  # warm-up step (5 s): not part of the estimate
    for k in range(TIME_PLAN_STEPS - 1):
        box.record(106.0 + k)
        assert box.steps_that_fit(now=106.0 + k) is None  # still measuring
    box.record(108.0)
    assert box.step_estimate() == 1.0
    assert box.steps_that_fit(now=108.0) == 12  # (20 - 8) s left at 1 s per step
    assert box.steps_that_fit(now=108.0) is None  # planned once
    assert not box.out_of_time(now=118.5, val_next=False)  # 18.5 + 1 <= 20
    assert box.out_of_time(now=119.5, val_next=False)
    box.val_seconds = 3.0
    assert box.out_of_time(now=117.0, val_next=True) and not box.out_of_time(now=117.0, val_next=False)
    assert not _TimeBox(None, 0.0, True).out_of_time(now=1e9, val_next=True)


def test_time_box_plans_again_from_the_steps_since_the_last_plan():
    from napari_unireg.train.loop import REPLAN_AT, TIME_PLAN_STEPS, _TimeBox

    box = _TimeBox(100.0, t_start=0.0, plan_steps=True)
    now = 0.0
    for k in range(TIME_PLAN_STEPS + 1):  # a 9 s warm-up step, then 2 s steps while the caches fill
        now += 9.0 if k == 0 else 2.0
        box.record(now)
    assert box.steps_that_fit(now) == int((100 - now) / 2.0)
    assert box.step_estimate() == 2.0  # the estimate the plan used, until new steps are timed
    plans = []
    while now < 95:  # then 1 s steps
        now += 1.0
        box.record(now)
        fit = box.steps_that_fit(now)
        if fit is not None:
            plans.append((now, fit))
    # one new plan at each REPLAN_AT fraction, from the 1 s steps alone (the 2 s ones no longer count), the last
    # at three quarters of the box: a run whose steps got faster late still fills its box
    assert [t for t, _ in plans] == [100 * f for f in REPLAN_AT] and plans[-1][0] == 75
    assert [fit for _, fit in plans] == [int(100 - t) for t, _ in plans]
    assert box.step_estimate() == 1.0 and not box.out_of_time(now=99.0, val_next=False)


def _time_boxed_run(ds, out, monkeypatch, plan: bool, steps: int = 1000, seconds=lambda step: 1.0):
    """A run of ``steps`` steps boxed into 20 s of a fake clock that advances ``seconds(step)`` per step."""
    from napari_unireg.train import loop

    now = [0.0]
    monkeypatch.setattr(loop, "_clock", lambda: now[0])

    def on_step(step, terms):
        now[0] += seconds(step)

    cfg = _cfg(
        ds,
        ("steps", steps),
        ("optim.time_limit_s", 20.0),
        ("optim.time_plan", plan),
        ("optim.pairs_per_epoch", 1),
        ("optim.T_0", 1000),  # unplanned, the rate would hardly move in 20 steps
        ("optim.T_mult", 1),
        ("log.tensorboard", False),
    )
    res = loop.train(cfg, out, on_step=on_step)
    with open(out / "log.csv", newline="") as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh)]
    card = json.loads((out / "final.json").read_text())
    assert not res.interrupted and card["training"]["steps"] == res.step == len(lrs)
    assert (out / "final.safetensors").is_file()
    return res, lrs


def test_time_limited_run_plans_its_steps_and_anneals_over_them(dataset, tmp_path, monkeypatch):
    from napari_unireg.train.loop import TIME_PLAN_STEPS

    res, lrs = _time_boxed_run(dataset, tmp_path / "run", monkeypatch, plan=True)
    # after TIME_PLAN_STEPS + 1 steps (clock 4 s) at 1 s/step, 16 more fit: 20 steps, ended by the plan
    assert res.step == 20 and not res.time_limited
    k0 = TIME_PLAN_STEPS + 1  # steps logged before the plan; the schedule then spans steps k0..20
    # §9: step s runs at the schedule's position s - 2 (set after step s - 1, with the position before it)
    expected = [1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * (s - 2) / 20)) for s in range(k0 + 1, 21)]
    assert lrs[k0:] == pytest.approx(expected, rel=1e-4)  # one cosine period over the planned 20 steps


def test_time_plan_capped_by_steps_still_anneals_over_the_run(dataset, tmp_path, monkeypatch):
    """``--steps 15`` inside a box that holds 20: the run is 15 steps and its cosine ends at eta_min there
    (before, the cap left the unplanned period of ``optim.T_0`` and the run ended at the full rate)."""
    from napari_unireg.train.loop import TIME_PLAN_STEPS

    res, lrs = _time_boxed_run(dataset, tmp_path / "run", monkeypatch, plan=True, steps=15)
    assert res.step == 15 and not res.time_limited
    k0 = TIME_PLAN_STEPS + 1
    expected = [1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * (s - 2) / 15)) for s in range(k0 + 1, 16)]
    assert lrs[k0:] == pytest.approx(expected, rel=1e-4)
    assert lrs[-1] < 0.06e-3  # the last step runs two positions before the period ends (§9)


def test_time_plan_lengthens_the_run_when_the_steps_get_faster(dataset, tmp_path, monkeypatch):
    """First steps 1 s (the plan: 20 steps), then 0.5 s: re-planned at a quarter of the box, the run takes the
    steps that fit (36) and still ends annealed, by its plan and not by the limit."""
    from napari_unireg.train.loop import TIME_PLAN_STEPS

    k0 = TIME_PLAN_STEPS + 1
    res, lrs = _time_boxed_run(dataset, tmp_path / "run", monkeypatch, plan=True,
                               seconds=lambda step: 1.0 if step <= k0 else 0.5)
    # clock 4 s after the first plan; 3 steps later (5.5 s, past 20 / 4) 14.5 s are left at 0.5 s: 29 more steps
    assert res.step == 7 + 29 and not res.time_limited
    assert lrs[-1] < 0.02e-3 and lrs[-1] < lrs[-2] < lrs[-3]  # annealed to the end of the longer period
    expected = [1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * (s - 2) / 36)) for s in range(9, 37)]
    assert lrs[8:] == pytest.approx(expected, rel=1e-4)  # one cosine period over the 36 steps from the re-plan


def test_time_limited_run_without_a_plan_stops_at_the_limit(dataset, tmp_path, monkeypatch):
    res, lrs = _time_boxed_run(dataset, tmp_path / "run", monkeypatch, plan=False)
    # clock k after step k; step k + 1 (1 s) would end past 20 s once k + 1 > 20
    assert res.step == 20 and res.time_limited and lrs[-1] > 0.9e-3


def test_time_limit_must_be_positive(dataset, tmp_path):
    from napari_unireg.train.loop import train

    with pytest.raises(UserError, match="time_limit_s"):
        train(_cfg(dataset, ("optim.time_limit_s", 0)), tmp_path / "run")


# ----------------------------------------------------------------------------------------------- precision
def test_auto_precision_per_machine(tmp_path):
    from napari_unireg.train import precision

    info = tmp_path / "cpuinfo"
    cases = {
        "fpu sse avx2 avx512f amx_bf16 amx_tile avx512_bf16": "amx",
        "fpu avx2 avx512f avx512_bf16 avx512_vnni": "avx512_bf16",  # e.g. AMD Zen 4
        "fpu sse avx2 fma": "none",
    }
    for flags, kind in cases.items():
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert precision.classify_bf16(precision._cpuinfo_flags(str(info))) == kind
        assert precision.auto_amp("cpu", cpu_support=kind) == ("none" if kind == "none" else "bf16")
    assert precision.auto_amp("cuda", cuda_bf16=True) == "bf16"
    assert precision.auto_amp("cuda", cuda_bf16=False) == "none"  # never fp16 unless asked for
    cpu = torch.device("cpu")
    assert precision.amp_dtype("none", cpu) is None and precision.amp_dtype("bf16", cpu) == torch.bfloat16
    assert precision.amp_dtype("auto", cpu) == (None if precision.cpu_bf16_support() == "none" else torch.bfloat16)
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        precision.amp_dtype("fp16", cpu)
    with pytest.raises(UserError, match="amp must be"):
        precision.amp_dtype("fp8", cpu)


def test_smooth_random_field_is_upsampling_then_gaussian_blur():
    """The separable-matrix field equals the definition: the control grid trilinearly upsampled (torch,
    align_corners) then blurred with σ = spacing/4 and replicate borders (scipy's gaussian_filter, mode nearest)."""
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    from napari_unireg.train.augment import _coarse_size, smooth_random_field

    shape, amplitude, spacing = (40, 37, 29), 2.5, 16.0  # σ = 4: 3σ is a whole radius, as scipy's truncate=3
    field = smooth_random_field(shape, np.random.default_rng(5), amplitude, spacing).numpy()
    coarse = np.random.default_rng(5).uniform(-1, 1, size=(1, 3, *_coarse_size(shape, spacing))).astype(np.float32)
    up = F.interpolate(torch.from_numpy(coarse) * amplitude, size=shape, mode="trilinear", align_corners=True)
    ref = np.stack([gaussian_filter(up[0, c].double().numpy(), 4.0, mode="nearest", truncate=3.0) for c in range(3)])
    assert field.shape == (1, 3, *shape)
    np.testing.assert_allclose(field[0], ref, atol=1e-5)


def test_unique_inverse_is_numpy_unique():
    from napari_unireg.train.synth import _unique_inverse

    for values in (np.random.default_rng(2).integers(0, 5000, 10_000), np.array([-3, 7, 7, 2]), np.array([0, 0, 4])):
        codes, inverse = _unique_inverse(values)
        ref_codes, ref_inverse = np.unique(values, return_inverse=True)
        assert np.array_equal(codes, ref_codes) and np.array_equal(inverse, ref_inverse)
