"""Training data: dataset discovery, validation pairs, on-the-fly loading and §9 pair sampling.

Everything random here is a pure function of ``(data.seed, pair index)``: the pair drawn at index ``i``, its
augmentation and its synthesis do not depend on how many DataLoader workers run, on which process draws it, or
on whether the run was resumed. Resuming therefore only needs the step counter, and distributed ranks simply
take interleaved pair indices (``i = batch·world + rank``), the pair-sampling equivalent of DistributedSampler.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = [
    "Entry",
    "TrainingSet",
    "discover",
    "subject_id",
    "PairPlan",
    "VolumeLoader",
    "PairDataset",
    "PairBatchSampler",
    "make_loader",
    "downsample_image",
    "downsample_labels",
    "write_packed",
    "read_packed",
    "PACKED_SUFFIX",
]

#: a packed volume (``benchmarks/pack_data.py``): an xz-compressed .npz already on the model grid
PACKED_SUFFIX = ".npz.xz"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", PACKED_SUFFIX)


# --------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class Entry:
    """One training image (and its label map when there is one)."""

    image: str
    label: str | None = None
    id: str = ""


@dataclass
class TrainingSet:
    """What a run trains and validates on."""

    entries: list[Entry]  # training images
    val_pairs: list[tuple[Entry, Entry]]  # (fixed, moving)
    excluded: set[frozenset[int]] = field(default_factory=set)  # unordered pairs of entry indices never trained on
    label_maps: list[str] = field(default_factory=list)  # label maps for synthesis
    source: str = ""
    dropped: list[str] = field(default_factory=list)  # ids removed by exclude_val_subjects
    n_external_maps: int = 0  # label_maps[:n] come from synth.label_maps (FreeSurfer codes), the rest from the data

    def describe(self) -> dict[str, Any]:
        """Summary for the model card and the log."""
        return {
            "source": self.source,
            "n_images": len(self.entries),
            "n_labelled": sum(e.label is not None for e in self.entries),
            "image_ids": [e.id for e in self.entries],
            "val_pairs": [[f.id, m.id] for f, m in self.val_pairs],
            "excluded_training_pairs": len(self.excluded),
            "dropped_val_subjects": list(self.dropped),
            "n_synth_label_maps": len(self.label_maps),
        }


def _strip(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES + (".npy",):
        if low.endswith(s):
            return name[: -len(s)]
    return name


def subject_id(path: str | Path) -> str:
    """``UNIREG_0001_0000.nii.gz`` → ``'0001'`` (Learn2Reg naming); otherwise the file name without suffix."""
    stem = _strip(Path(path).name)
    m = re.match(r"^.+?_(\d+)_(\d{4})$", stem)
    return m.group(1) if m else stem


def _check_files(entries: Sequence[Entry], where: str) -> None:
    missing = [p for e in entries for p in (e.image, e.label) if p is not None and not Path(p).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{where}: {len(missing)} listed file(s) missing: {', '.join(missing[:3])}{more}")


def _from_dataset_json(path: Path) -> tuple[list[Entry], list[tuple[str, str]] | None]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    items = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path} has no 'training' list (expected a Learn2Reg dataset.json)")
    root = path.parent
    entries = []
    for it in items:
        if isinstance(it, str):
            it = {"image": it}
        if not isinstance(it, dict) or "image" not in it:
            raise UserError(f"{path}: every 'training' item needs an 'image' path, got {it!r}")
        img = str((root / it["image"]).resolve())
        lab = str((root / it["label"]).resolve()) if it.get("label") else None
        entries.append(Entry(img, lab, subject_id(img)))
    val = None
    if isinstance(meta.get("registration_val"), list) and meta["registration_val"]:
        val = [
            (str((root / p["fixed"]).resolve()), str((root / p["moving"]).resolve())) for p in meta["registration_val"]
        ]
    return entries, val


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def _from_folder(folder: Path, label_folder: str | None) -> list[Entry]:
    images = _images_in(folder)
    if not images:
        raise UserError(f"{folder} holds no NIfTI images (.nii, .nii.gz)")
    labels: dict[str, str] = {}
    if label_folder:
        lf = Path(label_folder)
        if not lf.is_dir():
            raise UserError(f"label folder not found: {lf}")
        for p in _images_in(lf):
            labels.setdefault(p.name, str(p.resolve()))
            labels.setdefault(subject_id(p), str(p.resolve()))
    return [Entry(str(p.resolve()), labels.get(p.name) or labels.get(subject_id(p)), subject_id(p)) for p in images]


def _read_pairs_file(path: Path) -> list[tuple[str, str]]:
    """CSV/TSV ``fixed,moving`` ids or paths (header optional), or a JSON with a ``registration_val`` list
    (a Learn2Reg dataset.json; paths relative to the file's folder)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read validation pairs {path}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        items = data.get("registration_val") if isinstance(data, dict) else data
        try:
            rows = [
                (str((path.parent / p["fixed"]).resolve()), str((path.parent / p["moving"]).resolve())) for p in items
            ]
        except (TypeError, KeyError):
            raise UserError(f"{path}: expected a 'registration_val' list of {{fixed, moving}}") from None
    else:
        rows = []
        lines = [line for line in text.splitlines() if line.strip()]
        dialect = "excel-tab" if lines and "\t" in lines[0] else "excel"
        for row in csv.reader(lines, dialect=dialect):
            row = [c.strip() for c in row if c.strip()]
            if len(row) < 2:
                raise UserError(f"{path}: each line needs two columns fixed,moving, got {row}")
            if row[0].lower() != "fixed":
                rows.append((row[0], row[1]))
    if not rows:
        raise UserError(f"{path} lists no validation pairs")
    return rows


def _match(ref: str, entries: Sequence[Entry]) -> int | None:
    """Index of the entry a validation reference names (a path, a file name or a subject id)."""
    ref_path = str(Path(ref).resolve()) if ("/" in ref or ref.endswith(IMAGE_SUFFIXES)) else None
    for i, e in enumerate(entries):
        if ref_path and e.image == ref_path:
            return i
    key = subject_id(ref) if ref_path else ref
    hits = [i for i, e in enumerate(entries) if e.id == key or _strip(Path(e.image).name) == key]
    if len(hits) == 1:
        return hits[0]
    return None


def _label_for(image: str) -> str | None:
    """Learn2Reg layout guess for an image outside the training list: imagesXx/ → labelsXx/."""
    p = Path(image)
    if p.parent.name.startswith("images"):
        cand = p.parent.parent / ("labels" + p.parent.name[len("images") :]) / p.name
        if cand.is_file():
            return str(cand)
    return None


def _expand_label_maps(specs: Sequence[str]) -> list[str]:
    out: list[str] = []
    for s in specs:
        p = Path(s).expanduser()
        if p.is_dir():
            found = [str(q.resolve()) for q in _images_in(p)]
        elif any(c in s for c in "*?["):
            found = sorted(str(Path(q).resolve()) for q in glob.glob(os.path.expanduser(s)))
        elif p.is_file():
            found = [str(p.resolve())]
        else:
            raise UserError(f"synth.label_maps: {s} does not exist")
        if not found:
            raise UserError(f"synth.label_maps: {s} matches no label map")
        out.extend(found)
    return out


def discover(data_cfg: Any, synth_cfg: Any | None = None) -> TrainingSet:
    """Resolve ``data.source`` (dataset.json or folder), the validation pairs and the synthesis label maps."""
    if not data_cfg.source:
        raise UserError("no training data: give --data DATASET.json or a folder of images")
    src = Path(data_cfg.source).expanduser()
    if not src.exists():
        raise UserError(f"training data not found: {src}")
    json_val = None
    if src.is_dir():
        entries = _from_folder(src, data_cfg.labels)
        where = str(src)
    else:
        entries, json_val = _from_dataset_json(src)
        where = src.name
    _check_files(entries, where)

    # validation pairs
    vp = data_cfg.val_pairs
    refs: list[tuple[str, str]] = []
    if vp in (None, "", "none", "None"):
        refs = []
    elif vp == "auto":
        base = src if src.is_dir() else src.parent
        if json_val:
            refs = json_val
        elif (base / "pairs_val.csv").is_file():
            refs = _read_pairs_file(base / "pairs_val.csv")
    else:
        p = Path(vp).expanduser()
        if not p.is_file():
            raise UserError(f"validation pairs file not found: {p}")
        refs = _read_pairs_file(p)

    val_pairs: list[tuple[Entry, Entry]] = []
    excluded: set[frozenset[int]] = set()
    for f_ref, m_ref in refs:
        ends = []
        for ref in (f_ref, m_ref):
            i = _match(ref, entries)
            if i is not None:
                ends.append((i, entries[i]))
            elif Path(ref).is_file():  # a validation image outside the training list (e.g. L2R imagesVal)
                ends.append((None, Entry(str(Path(ref).resolve()), _label_for(ref), subject_id(ref))))
            else:
                raise UserError(f"validation pair ({f_ref}, {m_ref}): {ref!r} matches no training image or file")
        (fi, fe), (mi, me) = ends
        val_pairs.append((fe, me))
        if fi is not None and mi is not None:
            excluded.add(frozenset((fi, mi)))
    _check_files([e for pair in val_pairs for e in pair], "validation pairs")

    dropped: list[str] = []
    if data_cfg.exclude_val_subjects and val_pairs:
        val_images = {e.image for pair in val_pairs for e in pair}
        keep = [e for e in entries if e.image not in val_images]
        dropped = [e.id for e in entries if e.image in val_images]
        entries = keep
        excluded = set()
    elif not data_cfg.exclude_val_pairs:
        excluded = set()
    if len(entries) < 2 and not (synth_cfg is not None and synth_cfg.prob >= 1.0):
        raise UserError(f"{where}: at least 2 training images are needed, found {len(entries)}")

    label_maps: list[str] = []
    n_external = 0
    if synth_cfg is not None and synth_cfg.prob > 0:
        label_maps = _expand_label_maps(synth_cfg.label_maps)
        n_external = len(label_maps)
        if synth_cfg.use_dataset_labels:
            label_maps += [e.label for e in entries if e.label]
        if not label_maps:
            raise UserError("synth.prob > 0 but no label maps: set synth.label_maps or synth.use_dataset_labels")
        _check_files([Entry(p) for p in label_maps], "synth.label_maps")
    return TrainingSet(entries, val_pairs, excluded, label_maps, str(src), dropped, n_external)


# --------------------------------------------------------------------------------------------- pair sampling
@dataclass(frozen=True)
class PairSpec:
    kind: str  # "real" | "synth"
    a: int  # moving (entry index, or label-map index for synth)
    b: int  # fixed


class PairPlan:
    """§9 pair sampling as a pure function of the pair index.

    Pair ``i`` belongs to pass ``i // n``: the moving images of a pass are a seeded permutation of the
    eligible images (a shuffled pass, reshuffled for the next one); the fixed partner is a uniformly random
    other image such that the unordered pair is not a validation pair. With ``synth_prob`` > 0 the pair is
    replaced, with that probability, by a synthetic pair drawn from ``n_maps`` label maps.
    """

    def __init__(
        self,
        n_images: int,
        excluded: set[frozenset[int]] = frozenset(),
        seed: int = 0,
        synth_prob: float = 0.0,
        n_maps: int = 0,
        same_map_prob: float = 0.5,
    ) -> None:
        self.seed = int(seed)
        self.synth_prob = float(synth_prob) if n_maps else 0.0
        self.n_maps = n_maps
        self.same_map_prob = same_map_prob
        self.partners = [
            [j for j in range(n_images) if j != i and frozenset((i, j)) not in excluded] for i in range(n_images)
        ]
        self.eligible = [i for i in range(n_images) if self.partners[i]]
        if not self.eligible and self.synth_prob < 1.0:
            raise UserError("no training pair is left once the validation pairs are excluded")

    def rng(self, i: int, stream: int = 0) -> np.random.Generator:
        """The generator of pair ``i`` (stream 0: sampling, 1: augmentation/synthesis)."""
        return np.random.default_rng([self.seed, int(i), stream, 0x5EED])

    def __call__(self, i: int) -> PairSpec:
        r = self.rng(i)
        if self.synth_prob > 0 and r.random() < self.synth_prob:
            a = int(r.integers(self.n_maps))
            if self.n_maps == 1 or r.random() < self.same_map_prob:
                b = a
            else:
                b = int(r.integers(self.n_maps - 1))
                b += b >= a
            return PairSpec("synth", a, b)
        n = len(self.eligible)
        order = np.random.default_rng([self.seed, int(i) // n, 7, 0x5EED]).permutation(n)
        moving = self.eligible[int(order[int(i) % n])]
        parts = self.partners[moving]
        fixed = parts[int(r.integers(len(parts)))]
        return PairSpec("real", moving, fixed)


# --------------------------------------------------------------------------------------------- loading
def downsample_image(a: np.ndarray, factor: int) -> np.ndarray:
    """Average pooling by ``factor`` (dimensions must divide)."""
    if factor == 1:
        return a
    s = a.shape
    return a.reshape(s[0] // factor, factor, s[1] // factor, factor, s[2] // factor, factor).mean(axis=(1, 3, 5))


def downsample_labels(a: Any, factor: int) -> Any:
    """Nearest subsampling of a label map's last three axes (numpy array or torch tensor), aligned with
    :func:`downsample_image` up to half a voxel."""
    if factor == 1:
        return a
    o = factor // 2
    sub = a[..., o::factor, o::factor, o::factor]
    return np.ascontiguousarray(sub) if isinstance(sub, np.ndarray) else sub


def _is_box(vol: Any, grid: tuple[int, ...]) -> bool:
    return vol.shape == grid and np.allclose(vol.spacing, 1.0, atol=1e-3)


def write_packed(path: str | Path, data: np.ndarray, kind: str, preset: int = 6) -> int:
    """Write a model-grid volume as ``PACKED_SUFFIX`` (the GPU machine's carried data); returns the bytes written.

    Images (float in [0, 1]) are stored as uint8 steps of 1/255; label maps as uint8 indices into their
    ``codes`` (at most 256 distinct labels, any integer codes). LZMA with a delta filter: about 1.5 MB for a
    160×224×192 brain, 0.4 MB for a SynthSeg label map.
    """
    import io
    import lzma

    data = np.asarray(data)
    if kind == "image":
        arrays = {"data": np.clip(np.rint(data.astype(np.float32) * 255), 0, 255).astype(np.uint8),
                  "scale": np.float32(1 / 255)}
    else:
        codes, idx = np.unique(data, return_inverse=True)
        if codes.size > 256:
            raise UserError(f"{path}: {codes.size} distinct labels; a packed label map holds at most 256")
        arrays = {"data": idx.reshape(data.shape).astype(np.uint8), "codes": codes}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    filters = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": preset}]
    blob = lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, filters=filters)
    Path(path).write_bytes(blob)
    return len(blob)


def read_packed(path: str | Path, kind: str) -> np.ndarray:
    """Inverse of :func:`write_packed`: float32 image in [0, 1] or the integer label codes."""
    import io
    import lzma

    try:
        with np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes()))) as z:
            data = z["data"]
            if kind == "image":
                scale = float(z["scale"]) if "scale" in z.files else 1 / 255
                return data.astype(np.float32) * np.float32(scale)
            return z["codes"][data] if "codes" in z.files else data
    except (OSError, lzma.LZMAError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a packed volume ({e})") from None


def load_model_grid(path: str, kind: str, grid_shape: Sequence[int], ref_image: str | None = None) -> np.ndarray:
    """One volume on the model grid (canonical RAS, 1 mm, ``grid_shape``): image float32 [0, 1] or labels int.

    Same preparation as ``unireg register`` (:func:`napari_unireg.pipeline.model_grid.to_model_grid`), with a fast path
    for files already in the Learn2Reg box. A label map with ``ref_image`` (its image) follows the image's
    crop/pad so both stay aligned.
    """
    from ..io import load_volume
    from ..core.intensity import is_normalized, normalize_intensity
    from ..pipeline.model_grid import to_model_grid

    grid = tuple(int(s) for s in grid_shape)
    if str(path).endswith(PACKED_SUFFIX):
        arr = read_packed(path, kind)
        if arr.shape != grid:
            raise UserError(f"{path}: packed at {arr.shape}, not the model grid {grid}")
        return np.ascontiguousarray(arr)
    vol = load_volume(path, kind=kind)
    if kind == "image":
        if _is_box(vol, grid):
            data = vol.data if is_normalized(vol.data) else normalize_intensity(vol.data)
        else:
            data, _ = to_model_grid(vol, grid)
        return np.ascontiguousarray(data, dtype=np.float32)
    if _is_box(vol, grid):
        return np.ascontiguousarray(vol.data)
    if ref_image is not None:
        ref = load_volume(ref_image, kind="image")
        _, mapping = to_model_grid(ref, grid)
        return np.ascontiguousarray(mapping.to_model(vol))
    data, _ = to_model_grid(vol, grid)
    return np.ascontiguousarray(data)


class VolumeLoader:
    """Decoded volumes at the training resolution with a small LRU cache (and an optional .npy disk cache).

    One instance lives in each DataLoader worker (it is pickled to the workers empty), so at most
    ``cache_size`` volumes per process are in memory; nothing loads the whole data set.
    """

    def __init__(self, grid_shape: Sequence[int], factor: int = 1, cache_size: int = 4, cache_dir: str | None = None):
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.factor = int(factor)
        self.cache_size = int(cache_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._cache: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def _disk_key(self, path: str, kind: str, factor: int) -> Path | None:
        if self.cache_dir is None:
            return None
        st = os.stat(path)
        h = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{kind}|{factor}|{self.grid_shape}".encode()).hexdigest()
        return self.cache_dir / f"{_strip(Path(path).name)}-{h[:16]}.npy"

    def get(
        self, path: str, kind: str = "image", factor: int | None = None, ref_image: str | None = None
    ) -> np.ndarray:
        """``kind`` 'image' (float32) or 'label' (integer, ``ref_image`` = its image); ``factor`` defaults to the
        training one."""
        factor = self.factor if factor is None else int(factor)
        key = (path, kind, factor)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        disk = self._disk_key(path, kind, factor)
        if disk is not None and disk.is_file():
            arr = np.load(disk, mmap_mode="r")
        else:
            arr = load_model_grid(path, kind, self.grid_shape, ref_image)
            arr = (
                downsample_image(arr, factor).astype(np.float32) if kind == "image" else downsample_labels(arr, factor)
            )
            if disk is not None:
                disk.parent.mkdir(parents=True, exist_ok=True)
                tmp = disk.with_name(f".{disk.name}.{os.getpid()}.tmp.npy")
                np.save(tmp, arr)
                os.replace(tmp, disk)
        if self.cache_size > 0:
            self._cache[key] = arr
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return arr


# --------------------------------------------------------------------------------------------- torch side
class PairDataset:
    """Map-style dataset: item ``i`` is training pair ``i`` (see :class:`PairPlan`), ready for the network.

    Returns a dict of tensors: ``moving``, ``fixed`` (``1×S`` float32), ``moving_label``/``fixed_label``
    (``1×S`` int64, zeros when absent), ``has_labels`` (bool), ``synthetic`` (bool), ``index`` (int).
    """

    def __init__(self, tset: TrainingSet, cfg: Any, plan: PairPlan, loader: VolumeLoader, want_labels: bool) -> None:
        self.tset = tset
        self.cfg = cfg
        self.plan = plan
        self.loader = loader
        self.want_labels = want_labels
        self.factor = loader.factor

    def __len__(self) -> int:  # nominal; the batch sampler is infinite
        return 2**62

    def _real(self, spec: PairSpec, rng: np.random.Generator) -> dict[str, Any]:
        em, ef = self.tset.entries[spec.a], self.tset.entries[spec.b]
        mov = self.loader.get(em.image, "image")
        fix = self.loader.get(ef.image, "image")
        # loss.dice_pairs=synthetic: the real images' label maps never reach the loss (they may belong to the
        # subjects of the validation pairs), only the painted pairs' own label maps do.
        real_dice = self.want_labels and self.cfg.loss.dice_pairs == "all"
        has = real_dice and em.label is not None and ef.label is not None
        ml = self.loader.get(em.label, "label", ref_image=em.image) if has else None
        fl = self.loader.get(ef.label, "label", ref_image=ef.image) if has else None
        return {"moving": mov, "fixed": fix, "moving_label": ml, "fixed_label": fl, "has_labels": has}

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        spec = self.plan(i)
        rng = self.plan.rng(i, stream=1)
        if spec.kind == "synth":
            from .synth import synthesize_pair

            la = self.loader.get(self.tset.label_maps[spec.a], "label")
            lb = self.loader.get(self.tset.label_maps[spec.b], "label")
            t1 = max(spec.a, spec.b) < self.tset.n_external_maps
            out = synthesize_pair(la, lb, rng, self.cfg.synth, factor=self.factor, t1_codes=t1)
            out["has_labels"] = self.want_labels
            if not self.want_labels:
                out["moving_label"] = out["fixed_label"] = None
        else:
            out = self._real(spec, rng)
            if self.cfg.augment.enabled:
                from .augment import augment_pair

                out = augment_pair(out, rng, self.cfg.augment, factor=self.factor)
        shape = tuple(np.asarray(out["moving"]).shape[-3:])
        item = {
            "moving": torch.as_tensor(np.array(out["moving"], dtype=np.float32)).reshape(1, *shape),
            "fixed": torch.as_tensor(np.array(out["fixed"], dtype=np.float32)).reshape(1, *shape),
            "has_labels": bool(out["has_labels"]),
            "synthetic": spec.kind == "synth",
            "index": int(i),
        }
        for k in ("moving_label", "fixed_label"):
            v = out.get(k)
            item[k] = (
                torch.as_tensor(np.asarray(v).astype(np.int64)).reshape(1, *shape)
                if v is not None and out["has_labels"]
                else torch.zeros((1, 1, 1, 1), dtype=torch.int64)
            )
        return item


class PairBatchSampler:
    """Infinite batch sampler: batch ``k`` (from ``start``) of rank ``r`` holds pair indices
    ``(k·world + r)·B + j``, j < B. Ranks never share a pair; the position is just ``k``."""

    def __init__(self, start: int = 0, batch_size: int = 1, rank: int = 0, world: int = 1) -> None:
        self.start, self.batch_size, self.rank, self.world = int(start), int(batch_size), int(rank), int(world)

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            base = (k * self.world + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))
            k += 1


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for key in ("moving", "fixed"):
        out[key] = torch.stack([it[key] for it in items])
    has = all(it["has_labels"] for it in items)
    out["has_labels"] = has
    for key in ("moving_label", "fixed_label"):
        out[key] = torch.stack([it[key] for it in items]) if has else None
    out["synthetic"] = [it["synthetic"] for it in items]
    out["index"] = [it["index"] for it in items]
    return out


def make_loader(dataset: PairDataset, start_batch: int, batch_size: int, rank: int, world: int, cfg: Any):
    """DataLoader over :class:`PairDataset` starting at batch ``start_batch`` (the resume position)."""
    import torch.utils.data

    workers = max(0, int(cfg.data.num_workers))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=max(1, int(cfg.data.prefetch_factor)), persistent_workers=False)
    return torch.utils.data.DataLoader(
        dataset,  # any object with __getitem__ is a map-style dataset
        batch_sampler=PairBatchSampler(start_batch, batch_size, rank, world),
        num_workers=workers,
        collate_fn=_collate,
        **kwargs,
    )
