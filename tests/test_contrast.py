"""Contrast standardisation of the networks' inputs (``--contrast standardize``): the tissue fit against the
parameters of images made with known tissue classes, the mapping against the inverse of a known contrast change,
the reference against the training images, and the wiring through the engine and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import smooth_blob_volume

from napari_unireg.core.intensity import T1_TISSUE_MEANS, standardize_contrast, tissue_means
from napari_unireg.errors import UserError
from napari_unireg.io import volume_from_array
from napari_unireg.pipeline import RegisterOptions, register_volumes

MEANS = (0.33, 0.62, 0.9)


def _three_tissues(rng, shape=(40, 48, 40), means=MEANS, share=(0.2, 0.4, 0.4), sd=0.035) -> np.ndarray:
    """A brain-like image: background 0, three Gaussian tissue classes of known means and shares."""
    n = int(np.prod(shape))
    x = np.zeros(n, np.float32)
    inside = rng.random(n) < 0.6
    cls = rng.choice(3, size=n, p=share)
    x[inside] = np.clip(rng.normal(np.asarray(means)[cls[inside]], sd), 0.06, 0.998)
    return x.reshape(shape)


def test_tissue_means_recover_the_classes_of_a_known_mixture(rng):
    fitted = tissue_means(_three_tissues(rng))
    np.testing.assert_allclose(fitted, MEANS, atol=0.01)
    # the shares do not move the means (an atrophied brain: twice the CSF)
    fitted = tissue_means(_three_tissues(rng, share=(0.4, 0.3, 0.3)))
    np.testing.assert_allclose(fitted, MEANS, atol=0.01)


def test_standardize_undoes_another_contrast_mapping(rng):
    x = _three_tissues(rng, means=T1_TISSUE_MEANS[:2] + (0.9,))
    ref = tissue_means(x)
    for gamma in (0.6, 1.6):  # the robustness benchmark's contrast changes
        y = x ** gamma
        z = standardize_contrast(y, ref)
        inside = x > 0
        assert np.all(z[~inside] == 0)
        err_before, err_after = np.abs(y - x)[inside].mean(), np.abs(z - x)[inside].mean()
        assert err_after < 0.2 * err_before and err_after < 0.015, (gamma, err_before, err_after)
    # monotone: the order of intensities is kept
    order = np.argsort(y[inside])
    assert np.all(np.diff(z[inside][order]) >= 0)


def test_an_image_without_three_tissues_is_left_alone(rng):
    x = smooth_blob_volume((24, 28, 20), seed=1)
    x[x < 0.5] = 0
    x[x > 0] = 0.7  # one class
    assert tissue_means(x) is None
    assert np.array_equal(standardize_contrast(x), x)
    assert np.array_equal(standardize_contrast(np.zeros((8, 8, 8), np.float32)), np.zeros((8, 8, 8)))


def test_the_reference_is_the_median_of_the_training_images(shared_data):
    """T1_TISSUE_MEANS is what the code says it is: the median tissue means of the data set's training images
    on the model grid, scaled like every network input."""
    import json

    from napari_unireg.io import load_volume
    from napari_unireg.pipeline.model_grid import to_model_grid

    entries = json.loads((shared_data / "dataset.json").read_text())["training"]
    fits = [tissue_means(to_model_grid(load_volume(str(shared_data / e["image"]), "image"))[0]) for e in entries]
    assert all(f is not None for f in fits)
    np.testing.assert_allclose(np.median(fits, axis=0), T1_TISSUE_MEANS, atol=0.001)


def test_the_engine_standardises_the_network_inputs_only(monkeypatch, rng):
    """With ``contrast='standardize'`` the network sees the standardised pair (recomputed here), the result says
    so, and the warped image is the moving image's own intensities; a bad value is refused in one line."""
    import torch

    from napari_unireg.models.output import RegistrationOutput
    from napari_unireg.pipeline import register as reg
    from napari_unireg.pipeline.models import LoadedModel

    seen = []

    class Zero(torch.nn.Module):
        grid_multiple = 16

        def forward(self, moving, fixed):
            seen.append((moving.detach().clone(), fixed.detach().clone()))
            return RegistrationOutput(disp=torch.zeros(1, 3, *fixed.shape[2:]))

    monkeypatch.setattr(reg, "load_model", lambda *a: LoadedModel("zero", Zero(), {"resolution": "full"}, True))
    data = _three_tissues(rng, shape=(32, 32, 32)) ** 1.6
    vol = volume_from_array(data, np.eye(4), kind="image", name="img")
    opts = dict(prealign="none", grid_shape=(32, 32, 32), metrics=False)
    res = register_volumes(vol, vol, options=RegisterOptions(contrast="standardize", **opts))
    assert res.metrics["contrast"] == "standardize"
    moving_in = seen[-1][0][0, 0].numpy()
    scaled = register_volumes(vol, vol, options=RegisterOptions(**opts))
    assert scaled.metrics["contrast"] == "scale"
    plain_in = seen[-1][0][0, 0].numpy()
    np.testing.assert_allclose(moving_in, standardize_contrast(plain_in), atol=1e-6)
    assert np.abs(moving_in - plain_in).max() > 0.05  # the gamma was undone, not nothing
    np.testing.assert_allclose(res.warped, scaled.warped, atol=1e-6)  # outputs keep the scaled images
    with pytest.raises(UserError, match="unknown contrast 'bright'"):
        register_volumes(vol, vol, options=RegisterOptions(contrast="bright", **opts))
