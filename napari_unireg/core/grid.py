"""The one geometry type: a voxel grid (shape + voxel→world affine), in the spirit of deepali's ``Grid``.

Conventions (written once here; :mod:`.sample` and :mod:`.resample` sample by them):

* A grid is ``shape`` (3 ints) and ``affine``: 4×4, voxel index → world RAS mm (NIfTI convention). Voxel index
  ``i`` is the centre of voxel ``i`` (``align_corners=True`` style).
* Inside the package every grid is **canonical RAS** (``nibabel.as_closest_canonical``: array axes ≈ R, A, S);
  :mod:`napari_unireg.io` converts at the file edge.
* A voxel map ``M`` (4×4) between two grids is a *pull* map: output voxel ``q`` reads input voxel ``M @ q``.
  ``a.voxel_map(b, world)`` = ``inv(b.affine) @ world @ a.affine``: a voxel of ``a`` → the voxel of ``b`` at the
  world point ``world @ x`` (``world`` = a pull transform in mm, e.g. the affine pre-alignment; identity if None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "voxel_map", "apply_affine_field", "translation"]


def voxel_map(src_affine: np.ndarray, dst_affine: np.ndarray, world: np.ndarray | None = None) -> np.ndarray:
    """4×4 voxel map ``inv(dst_affine) @ world @ src_affine``: a voxel of the src grid → the dst voxel it reads."""
    m = np.asarray(src_affine, dtype=np.float64)
    if world is not None:
        m = np.asarray(world, dtype=np.float64) @ m
    return np.linalg.solve(np.asarray(dst_affine, dtype=np.float64), m)


def apply_affine_field(matrix: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """``matrix`` (4×4) applied to a coordinate field ``3×...`` (channel first), float64 (the input itself for
    the identity matrix)."""
    m = np.asarray(matrix, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    if np.allclose(m, np.eye(4), rtol=0, atol=1e-12):
        return coords  # the common case (same grid, no pre-alignment): no 3×S float64 pass
    out = np.tensordot(m[:3, :3], coords, axes=(1, 0))
    out += m[:3, 3].reshape((3,) + (1,) * (coords.ndim - 1))
    return out


def translation(t: Sequence[float]) -> np.ndarray:
    """4×4 translation matrix."""
    m = np.eye(4)
    m[:3, 3] = t
    return m


@dataclass(frozen=True, eq=False)
class Grid:
    """A 3-D voxel grid: ``shape`` and ``affine`` (voxel → world RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4) or len(self.shape) != 3:
            raise ValueError(f"a grid needs 3 sizes and a 4×4 affine, got {self.shape} and {a.shape}")
        object.__setattr__(self, "affine", a)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size per array axis (mm): the column norms of the affine."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
        """Same shape and (within ``atol`` mm) the same affine."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol, rtol=0)

    def voxel_map(self, other: Grid, world: np.ndarray | None = None) -> np.ndarray:
        """4×4 pull map from this grid's voxels to ``other``'s voxels (through ``world`` if given)."""
        return voxel_map(self.affine, other.affine, world)

    def with_spacing(self, spacing: Sequence[float]) -> Grid:
        """The grid of ``spacing`` mm covering this grid's field of view: voxel 0 kept, same orientation."""
        factor = np.asarray(spacing, dtype=np.float64) / self.spacing  # input voxels per output voxel
        shape = tuple(int(np.floor((n - 1) / f + 1e-6)) + 1 for n, f in zip(self.shape, factor))
        return Grid(shape, self.affine @ np.diag([*factor, 1.0]))

    def window(self, start: Sequence[int], shape: Sequence[int]) -> Grid:
        """The sub/super grid whose voxel ``q`` is this grid's voxel ``q + start`` (crop/pad)."""
        return Grid(tuple(shape), self.affine @ translation(start))

    def world_box(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)``: the world bounding box (mm) of the voxel centres."""
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in self.shape], indexing="ij")).reshape(3, -1).T
        w = self.world(corners)
        return w.min(axis=0), w.max(axis=0)

    def world(self, index: np.ndarray) -> np.ndarray:
        """World coordinates of voxel indices ``N×3``."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]
