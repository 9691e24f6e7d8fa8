"""Every bundled weight file loads without unpickling and its model card says how it was made and how it does.

The bundled set is written here, not read from the registry: a registry that cannot list the models, or lists
fewer, makes these tests fail instead of turning them into skips. A bundled model whose weights or card is missing
or corrupt must stop `register` with one line and exit 2 (never untrained weights with exit 0); those cases run on
a copy of the models folder that ``UNIREG_MODELS_DIR`` points at.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import smooth_blob_volume
from napari_unireg.cli import main
from napari_unireg.models.registry import list_models, load_pretrained, weights_dir

#: The models shipped in ``models/`` (update when a model is added to or removed from the bundle).
BUNDLED = ("dp-conv-mf", "dp-conv-mfc", "dp-conv-c", "dp-convic-mf", "dp-convic-c", "dp-vfa")
#: every bundled weight file (stem): each model's main pair, and dp-vfa's weights trained at 2 mm beside its 1 mm ones
WEIGHT_FILES = (*BUNDLED, "dp-vfa.half")


def test_registry_lists_exactly_the_bundled_models():
    infos = list_models()
    names = [m.name for m in infos]
    assert len(names) == len(set(names)) == 10
    assert {m.name for m in infos if m.weights} == set(BUNDLED)
    assert all(m.card is not None for m in infos if m.weights)
    folder = weights_dir()
    assert {p.stem for p in folder.glob("*.safetensors")} == set(WEIGHT_FILES)
    assert {p.stem for p in folder.glob("*.json")} == set(WEIGHT_FILES)
    files = {m.name: set(m.cards) for m in infos if m.weights}
    assert files["dp-vfa"] == {"full", "half"} and files["dp-conv-c"] == {"half"}


@pytest.mark.parametrize("stem", WEIGHT_FILES)
def test_bundled_model_card_and_weights(stem):
    import torch

    name, _, resolution = stem.partition(".")
    model, card = load_pretrained(name, resolution=resolution or None)
    assert card["architecture"] == name and card["resolution"] == (resolution or card["resolution"])
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


def test_default_model_is_the_flagged_one_else_the_best_bundled_one():
    from napari_unireg.pipeline.models import default_model_name

    cards = {m.name: m.card for m in list_models() if m.name in BUNDLED}
    flagged = [n for n in BUNDLED if cards[n].get("default")]
    best = max(BUNDLED, key=lambda n: cards[n]["metrics"]["dice"])
    assert flagged == ["dp-vfa"]  # the documented default, kept when another variant's Dice passes it
    assert default_model_name() == (flagged[0] if flagged else best)


# ------------------------------------------------------------------------------------ broken bundle → exit 2


@pytest.fixture
def models_copy(tmp_path, monkeypatch) -> Path:
    """A models folder of symbolic links to the real files, used by the registry via UNIREG_MODELS_DIR."""
    folder = tmp_path / "models"
    folder.mkdir()
    for path in weights_dir().iterdir():
        if path.suffix in (".json", ".safetensors"):
            (folder / path.name).symlink_to(path.resolve())
    monkeypatch.setenv("UNIREG_MODELS_DIR", str(folder))
    return folder


def _replace(link: Path, data: bytes | None) -> None:
    """Replace a link of the copy by a file holding ``data`` (None: delete it); the real file is never written."""
    original = link.resolve().read_bytes() if data is not None else b""
    link.unlink()
    if data is not None:
        link.write_bytes(data if data != b"<truncate>" else original[: len(original) // 2])


def _card_with(folder: Path, name: str, **changes) -> bytes:
    card = json.loads((folder / f"{name}.json").read_text())
    card.update(changes)
    return json.dumps(card).encode()


@pytest.fixture
def tiny_pair(tmp_path) -> tuple[str, str]:
    paths = []
    for role, seed in (("fixed", 1), ("moving", 2)):
        path = tmp_path / f"{role}.nii.gz"
        nib.save(nib.Nifti1Image(smooth_blob_volume((32, 32, 32), seed=seed), np.eye(4)), str(path))
        paths.append(str(path))
    return paths[0], paths[1]


BREAKAGES = {
    "card deleted": ("json", None),
    "card not JSON": ("json", b"{ not json"),
    "card of another network": ("json", "architecture=dp-conv-c"),
    "card without sha256": ("json", "sha256="),
    "weights deleted": ("safetensors", None),
    "weights truncated": ("safetensors", b"<truncate>"),
}


def _break(folder: Path, name: str, breakage: str) -> None:
    suffix, data = BREAKAGES[breakage]
    if isinstance(data, str):  # a card edit "key=value"
        key, value = data.split("=")
        data = _card_with(folder, name, **{key: value})
    _replace(folder / f"{name}.{suffix}", data)


def test_the_models_copy_is_what_the_registry_reads(models_copy):
    assert weights_dir() == models_copy
    assert {m.name for m in list_models() if m.weights} == set(BUNDLED)
    _replace(models_copy / "dp-conv-c.json", None)
    _replace(models_copy / "dp-conv-c.safetensors", None)  # both files gone: simply not bundled
    assert {m.name for m in list_models() if m.weights} == set(BUNDLED) - {"dp-conv-c"}


@pytest.mark.parametrize("stem", ["dp-vfa", "dp-vfa.half"])
@pytest.mark.parametrize("model", ["dp-vfa", "default"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_register_with_a_broken_bundled_model_is_an_error(models_copy, tiny_pair, tmp_path, capsys, breakage, model,
                                                          stem):
    """The broken model is dp-vfa (the default), either of its weight files: asked for by name or as the default
    at the resolution of that file, `register` refuses."""
    resolution = json.loads((models_copy / f"{stem}.json").read_text())["resolution"]
    _break(models_copy, stem, breakage)
    out = tmp_path / "out"
    rc = main(["register", *tiny_pair, "--model", model, "--resolution", resolution, "--device", "cpu",
               "--prealign", "none", "--grid", "32", "32", "32", "--out", str(out), "--quiet"])  # fails fast too
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "dp-vfa" in lines[0], lines
    assert "UNTRAINED" not in captured.out
    assert not (out / "metrics.json").exists() and not (out / "warped.nii.gz").exists()


@pytest.mark.parametrize("breakage", ["card deleted", "card not JSON", "weights deleted"])
def test_models_command_reports_a_broken_bundle(models_copy, capsys, breakage):
    _break(models_copy, "dp-conv-mf", breakage)
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dp-conv-mf" in err[0] and "broken" in err[0]


def test_models_dir_that_is_not_a_folder_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNIREG_MODELS_DIR", str(tmp_path / "nowhere"))
    assert main(["models"]) == 2
    assert "UNIREG_MODELS_DIR" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the cards' own numbers


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("stem", WEIGHT_FILES)
def test_register_reproduces_the_card(stem, shared_data, tmp_path):
    """`unireg register` on validation pair 0001←0002 at the resolution of a weight file's card runs that file
    and gives the card's per-pair numbers (network alone)."""
    name = stem.partition(".")[0]
    card = json.loads((weights_dir() / f"{stem}.json").read_text())
    run = next(r for r in card["evaluation"]["runs"] if r["io_steps"] == 0)
    row = next(r for r in run["per_pair"] if r["pair"] == "0001_0002")
    img, lab = shared_data / "imagesTr", shared_data / "labelsTr"
    out = tmp_path / "out"
    rc = main(["register", str(img / "UNIREG_0001_0000.nii.gz"), str(img / "UNIREG_0002_0000.nii.gz"),
               "--fixed-seg", str(lab / "UNIREG_0001_0000.nii.gz"),
               "--moving-seg", str(lab / "UNIREG_0002_0000.nii.gz"),
               "--model", name, "--resolution", card["resolution"], "--device", "cpu", "--prealign", "none",
               "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_sha256"] == card["sha256"]
    assert metrics["dice"] == pytest.approx(row["dice"], abs=2e-3)
    assert metrics["hd95"] == pytest.approx(row["hd95"], abs=0.05)
    assert metrics["sdlogj"] == pytest.approx(row["sdlogj"], abs=2e-3)
    assert metrics["ndv"] == pytest.approx(row["ndv"], abs=0.01)



# ------------------------------------------------------------------------------------ weights per resolution


@pytest.fixture
def two_resolutions(models_copy) -> dict:
    """dp-conv-c (bundled at half resolution) given a second weight file ``dp-conv-c.full``: the same tensors with a
    card that says 1 mm, told apart by its description."""
    main_card = json.loads((models_copy / "dp-conv-c.json").read_text())
    assert main_card["resolution"] == "half"
    (models_copy / "dp-conv-c.full.safetensors").symlink_to((models_copy / "dp-conv-c.safetensors").resolve())
    card = dict(main_card, resolution="full", description="the 1 mm weights")
    (models_copy / "dp-conv-c.full.json").write_text(json.dumps(card))
    return card


def test_a_model_with_weights_per_resolution_runs_the_ones_for_the_resolution_and_device(two_resolutions, tiny_pair,
                                                                                         tmp_path, capsys):
    import hashlib

    from napari_unireg.models.registry import bundled_weights
    from napari_unireg.pipeline.models import clear_model_cache, load_model, network_plan

    assert set(bundled_weights("dp-conv-c")) == {"half", "full"}
    assert set(bundled_weights("dp-conv-mf")) == {"half"}
    clear_model_cache()
    assert load_model("dp-conv-c", None, "cpu", "auto").card["resolution"] == "half"  # on a CPU: the 2 mm weights
    assert load_model("dp-conv-c", None, "cpu", "full").card["description"] == "the 1 mm weights"
    assert load_model("dp-conv-c", None, "cpu", "half").card["resolution"] == "half"
    assert network_plan("dp-conv-c", None, "auto", "cpu") == ("dp-conv-c", "half")
    assert network_plan("dp-conv-c", None, "auto", "cuda:0") == ("dp-conv-c", "full")  # on a GPU: the 1 mm weights
    assert network_plan("dp-conv-mf", None, "auto", "cuda:0") == ("dp-conv-mf", "half")  # one file: its own
    clear_model_cache()

    out = tmp_path / "out"
    assert main(["register", *tiny_pair, "--model", "dp-conv-c", "--resolution", "full", "--device", "cpu",
                 "--prealign", "none", "--grid", "32", "32", "32", "--out", str(out), "--quiet"]) == 0
    facts = json.loads((out / "metrics.json").read_text())
    weights = (weights_dir() / "dp-conv-c.full.safetensors").read_bytes()
    assert (facts["resolution"], facts["weights_resolution"]) == ("full", "full")
    assert facts["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert "model dp-conv-c at 1 mm on cpu" in capsys.readouterr().out  # the one-line summary says which

    assert main(["models", "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["dp-conv-c"]
    assert set(row["weights_by_resolution"]) == {"half", "full"}
    assert row["weights_by_resolution"]["full"]["description"] == "the 1 mm weights"


def test_a_second_weight_file_whose_card_names_another_resolution_is_a_broken_bundle(two_resolutions, models_copy,
                                                                                    capsys):
    (models_copy / "dp-conv-c.full.json").write_text(json.dumps(dict(two_resolutions, resolution="half")))
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dp-conv-c.full.json" in err[0] and "broken" in err[0]


def test_weights_choice():
    from napari_unireg.pipeline.models import weights_choice

    both, one = {"full": 1, "half": 1}, {"full": 1}
    assert [weights_choice(both, "full", "auto", d) for d in ("cpu", "cuda", "cuda:1")] == ["half", "full", "full"]
    assert [weights_choice(both, "full", r, "cpu") for r in ("full", "half")] == ["full", "half"]
    assert [weights_choice(one, "full", r, d) for r in ("auto", "half") for d in ("cpu", "cuda")] == ["full"] * 4
