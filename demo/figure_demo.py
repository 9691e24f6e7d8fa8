"""The paper's comparison figure (ARCHITECTURE.md §12) on the embedded demo pair, one column per bundled model.

The demo pair (MNI152 template vs. the same brain through a known smooth deformation and affine, see
``napari_unireg.io.demo_data``) is built offline on first use. Every model with bundled weights registers it
(``napari_unireg.pipeline.register_volumes``); ``--truth`` adds the known deformation as a last column.
``--synthetic`` skips the models and draws fractions of the known deformation instead (a layout preview that
needs no weights).

    python demo/figure_demo.py --out demo_figures                  # every bundled model, axes 0 1 2, 300 dpi PNG
    python demo/figure_demo.py --models dp_convic_c,classical --truth --format png pdf
    python demo/figure_demo.py --synthetic --dpi 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def bundled_models() -> list[str]:
    """Names of the registry models that ship weights."""
    from napari_unireg.models.registry import list_models

    return [m.name for m in list_models() if m.weights]


def registration_truth(true_disp: np.ndarray) -> np.ndarray:
    """The ideal registration field of the demo pair.

    ``demo_data`` makes ``moving(p) = fixed(p + t(p))``, so ``t`` warps the fixed image into the moving one; the
    fixed→moving pull field a registration should find (``moving(p + u(p)) = fixed(p)``) is its inverse
    ``u(p) = −t(p + u(p))``, solved with the Anderson fixed point of :mod:`napari_unireg.core.inversion`.
    """
    import torch

    from napari_unireg.core.inversion import invert_displacement

    with torch.no_grad():
        u = invert_displacement(torch.from_numpy(np.ascontiguousarray(true_disp, np.float32))[None], tol=1e-3)
    return u[0].numpy()


def synthetic_methods(true_disp: np.ndarray) -> dict[str, np.ndarray]:
    """Stand-ins for methods when no weights exist: the known deformation scaled, and with smooth noise."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    noise = np.stack([gaussian_filter(rng.normal(size=true_disp.shape[1:]), 2.0) for _ in range(3)])
    noise *= 1.5 / np.abs(noise).max()
    return {
        "Identity": np.zeros_like(true_disp),
        "Truth x0.5": 0.5 * true_disp,
        "Truth + noise": true_disp + noise.astype(np.float32),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_figures", help="output folder (default demo_figures)")
    ap.add_argument("--models", default=None, help="comma-separated model names (default: every bundled model)")
    ap.add_argument("--truth", action="store_true", help="add the known deformation as the last column")
    ap.add_argument("--synthetic", action="store_true", help="no registration: draw variants of the known field")
    ap.add_argument("--axis", type=int, nargs="+", choices=(0, 1, 2), default=[0, 1, 2])
    ap.add_argument("--format", nargs="+", choices=("png", "svg", "pdf"), default=["png"], dest="formats")
    ap.add_argument("--dpi", type=float, default=300)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg", force=False)
    from napari_unireg.io.demo import demo_files, demo_volumes
    from napari_unireg.errors import UserError
    from napari_unireg.viz import comparison_figure, save_figure

    try:
        fixed, moving, fixed_seg, moving_seg = demo_volumes()
        truth = registration_truth(np.load(demo_files()["true_disp"]))
        methods: dict[str, np.ndarray] = {}
        if args.synthetic:
            methods.update(synthetic_methods(truth))
        else:
            from napari_unireg.pipeline import register_volumes
            from napari_unireg.pipeline import RegisterOptions

            names = [m.strip() for m in args.models.split(",")] if args.models else bundled_models()
            if not names:
                raise UserError("no model ships weights yet: pass --models NAME,... (e.g. classical) or --synthetic")
            for name in names:
                print(f"registering the demo pair with {name} ...", file=sys.stderr)
                res = register_volumes(fixed, moving, fixed_seg, moving_seg,
                                       options=RegisterOptions(model=name, device=args.device))
                methods[res.model_name or name] = res.disp_native
                print(f"  {name}: Dice {res.metrics.get('dice_before', float('nan')):.3f} -> "
                      f"{res.metrics.get('dice', float('nan')):.3f}", file=sys.stderr)
        if args.truth:
            methods["Known deformation"] = truth
        for axis in args.axis:
            fig = comparison_figure(fixed.data, moving.data, methods, fixed_seg.data, moving_seg.data, axis=axis,
                                    spacing=fixed.spacing, fixed_id="MNI152", moving_id="demo")
            for p in save_figure(fig, Path(args.out), formats=args.formats, dpi=args.dpi, overwrite=args.overwrite):
                print(p)
    except UserError as exc:
        print(f"figure_demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
