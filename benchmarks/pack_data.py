"""Pack the training data a GPU run needs into one small folder that travels with the working tree.

A lent GPU machine gets the tracked tree plus up to 64 MiB in all of carried (ignored) paths, not ``../shared``.
This writes, on the model grid (160×224×192, RAS, 1 mm, as ``unireg train`` prepares them):

* ``imagesTr/<name>.npz.xz``: every training image as uint8 steps of 1/255,
* ``labelsTr/<name>.npz.xz``: their label maps (uint8 indices + codes),
* ``synth/<name>.npz.xz``: the SynthSeg label maps for synthesis (``--synth-maps`` of them, FreeSurfer codes kept),
* ``dataset.json``: the source's Learn2Reg description with the paths rewritten (validation pairs kept),

LZMA-compressed (``napari_unireg.train.data.write_packed``; the trainer reads these files like NIfTI).

    python benchmarks/pack_data.py --data ../shared/data/dataset.json --out .carry/data
    unireg train --data .carry/data/dataset.json --set 'synth.label_maps=[.carry/data/synth]' ...

``.carry/`` is in .gitignore: the folder is never committed (the development data may not be redistributed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GRID = (160, 224, 192)


def _name(path: str) -> str:
    from napari_unireg.train.data import PACKED_SUFFIX, _strip

    return _strip(Path(path).name) + PACKED_SUFFIX


def pack(dataset: str | Path, out: str | Path, synth_maps: str | Path | None = None, n_synth: int | None = None,
         grid=GRID, preset: int = 6, log=print) -> dict:
    """Pack ``dataset`` (Learn2Reg dataset.json) + ``synth_maps`` (folder) into ``out``; returns a summary."""
    from napari_unireg.errors import UserError
    from napari_unireg.train.data import _expand_label_maps, _from_dataset_json, load_model_grid, write_packed

    dataset, out = Path(dataset).resolve(), Path(out)
    entries, val = _from_dataset_json(dataset)
    meta = json.loads(dataset.read_text())
    for sub in ("imagesTr", "labelsTr", "synth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t0, total, files = time.perf_counter(), 0, 0
    new_of: dict[str, str] = {}
    training = []
    for e in entries:
        img = f"./imagesTr/{_name(e.image)}"
        total += write_packed(out / img, load_model_grid(e.image, "image", grid), "image", preset)
        item = {"image": img}
        if e.label:
            lab = f"./labelsTr/{_name(e.label)}"
            arr = load_model_grid(e.label, "label", grid, ref_image=e.image)
            total += write_packed(out / lab, arr, "label", preset)
            item["label"] = lab
            files += 1
        files += 1
        new_of[e.image] = img
        training.append(item)
        log(f"# packed {Path(e.image).name} ({total / 1e6:.1f} MB so far)")
    maps = _expand_label_maps([str(synth_maps)]) if synth_maps else []
    if n_synth is not None:
        maps = maps[:n_synth]
    for m in maps:
        total += write_packed(out / "synth" / _name(m), load_model_grid(m, "label", grid), "label", preset)
        files += 1
        log(f"# packed {Path(m).name} ({total / 1e6:.1f} MB so far)")
    meta["training"] = training
    meta["numTraining"] = len(training)
    if val:
        missing = [p for pair in val for p in pair if p not in new_of]
        if missing:
            raise UserError(f"{dataset}: validation image {missing[0]} is not in the training list")
        meta["registration_val"] = [{"fixed": new_of[f], "moving": new_of[m]} for f, m in val]
    meta["packed"] = {
        "by": "benchmarks/pack_data.py",
        "source": str(dataset),
        "grid_shape": list(grid),
        "format": "xz-compressed npz: images uint8 x 1/255, labels uint8 indices into 'codes'",
        "synth_maps": [Path(m).name for m in maps],
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "images": len(training), "labels": sum("label" in t for t in training),
            "synth_maps": len(maps), "files": files + 1, "bytes": size, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Learn2Reg dataset.json of the source")
    p.add_argument("--out", default=".carry/data", help="folder to write (ignored by git)")
    p.add_argument("--synth", default="auto", help="folder of SynthSeg label maps (auto: synthseg_labels/ beside "
                   "--data when present; none: no synthesis maps)")
    p.add_argument("--synth-maps", type=int, default=9, help="how many synthesis maps to pack (~0.4 MB each; "
                   "9 keep the tracked tree, the nibabel wheel and the pack under the 64 MiB a lent GPU takes)")
    p.add_argument("--preset", type=int, default=6, help="LZMA preset (0-9)")
    args = p.parse_args(argv)
    from napari_unireg.errors import UserError

    synth = args.synth
    if synth == "auto":
        cand = Path(args.data).resolve().parent / "synthseg_labels"
        synth = str(cand) if cand.is_dir() else None
    elif synth == "none":
        synth = None
    try:
        res = pack(args.data, args.out, synth, args.synth_maps, preset=args.preset,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    print(f"# {res['out']}: {res['images']} images, {res['labels']} label maps, {res['synth_maps']} synthesis maps, "
          f"{res['bytes'] / 2**20:.1f} MiB in {res['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
