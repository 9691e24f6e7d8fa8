"""The paper's comparison figure on a pair of the development brains (../shared/data: fixed 0001, moving 0002).

Takes displacement files (Learn2Reg convention, e.g. ``disp.nii.gz`` written by ``unireg register``) or model
names, and calls ``unireg figure``. The development data must never be committed or redistributed, and neither
may figures made from them: the output goes to a temporary folder unless ``--out`` says otherwise (outside
the repository!).

    python demo/figure_shared.py --disp DP-ConvIC-C=out_convic/disp.nii.gz --disp Classical=out_cls/disp.nii.gz
    python demo/figure_shared.py --models dp_convic_c,classical --axis 2 --format png pdf
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("UNIREG_SHARED_DATA", str(DEFAULT_DATA)),
                    help="the development data folder (default ../shared/data or $UNIREG_SHARED_DATA)")
    ap.add_argument("--fixed", default="0001", help="fixed subject id (default 0001)")
    ap.add_argument("--moving", default="0002", help="moving subject id (default 0002)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--disp", action="append", metavar="NAME=FILE", help="a method's displacement file (repeat)")
    src.add_argument("--models", metavar="A,B,...", help="register with these models")
    ap.add_argument("--axis", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--format", nargs="+", default=["png"])
    ap.add_argument("--dpi", default="300")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "unireg_figures_shared"))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    data = Path(args.data)
    img = {s: data / "imagesTr" / f"UNIREG_{s}_0000.nii.gz" for s in (args.fixed, args.moving)}
    seg = {s: data / "labelsTr" / f"UNIREG_{s}_0000.nii.gz" for s in (args.fixed, args.moving)}
    if not all(p.exists() for p in img.values()):
        print(f"figure_shared: the development data are not available under {data}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    repo = Path(__file__).resolve().parents[1]
    if out == repo or repo in out.parents:
        print("figure_shared: refusing to write figures of the development data inside the repository",
              file=sys.stderr)
        return 2

    argv_fig = ["figure", "--fixed", str(img[args.fixed]), "--moving", str(img[args.moving]),
                "--fixed-id", args.fixed, "--moving-id", args.moving,
                "--axis", *args.axis, "--format", *args.format, "--dpi", args.dpi, "--out", str(out)]
    if all(p.exists() for p in seg.values()):
        argv_fig += ["--fixed-seg", str(seg[args.fixed]), "--moving-seg", str(seg[args.moving])]
    if args.disp:
        for spec in args.disp:
            argv_fig += ["--disp", spec]
    else:
        argv_fig += ["--models", args.models]
    if args.overwrite:
        argv_fig.append("--overwrite")

    import matplotlib

    matplotlib.use("Agg", force=False)
    from napari_unireg.cli import main as unireg_main

    rc = unireg_main(argv_fig)
    if rc == 0:
        print("(development data: do not commit or share these figures)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
