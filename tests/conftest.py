"""Shared fixtures: the development data folder (skips when absent; its tests get the ``data`` marker) and tiny
synthetic volumes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(os.environ.get("UNIREG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """Every test that uses the ``shared_data`` fixture carries the ``data`` marker (``-m "not data"`` drops it)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (real brains for development); skips the test when it is absent."""
    if not (SHARED_DATA / "imagesTr").is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def smooth_blob_volume(shape=(24, 28, 20), seed: int = 0) -> np.ndarray:
    """A smooth positive test image in [0, 1] with structure at several scales."""
    from scipy.ndimage import gaussian_filter

    r = np.random.default_rng(seed)
    vol = gaussian_filter(r.random(shape), 2.0)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    return vol.astype(np.float32)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options)`` mounts a tmpfs at a fresh folder and returns it (a real read-only or full disk, as root);
    skips where mounting is not allowed."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
