"""Bundle a run that continued a bundled model as the next stage of its card.

    python benchmarks/bundle_stage.py runs/dp-conv-c-s8 --what "session 8: from stage 1's weights, ..."

The run folder holds the export of ``unireg train --init-encoder models/X.safetensors ...`` (``X.safetensors``,
``X.json``, ``config.yaml``, ``log.csv``, ``val.csv``; for a model trained by ``benchmarks/gpu_run.py``: a folder
holding the ``X.safetensors``, ``X.json`` and ``X-log.csv`` it brought home, the rest is written from the card).
This script

* turns the bundled card's training record into stages (a card without ``training.stages`` becomes stage 1) and
  gives the last stage the sha256 of the weights the run started from, so each stage can be reproduced in turn;
* appends the run as the next stage (its command with machine paths made relative to the repository, steps,
  wall time, hardware, best step, date) and sets ``total_steps`` and ``total_wall_time_s``;
* copies the weights and the new card to ``models/`` and ``config.yaml``/``log.csv``/``val.csv`` to
  ``models/training/<run folder name>/`` (never ``last.pt``: no optimiser state is committed).

The card's ``metrics`` are the run's own validation until ``benchmarks/model_card_metrics.py --from-report``
refreshes them from an accuracy run. Refuses a run that did not start from the bundled weights.

A run trained at another resolution than the model's main pair (``--resolution half`` from 1 mm weights) is bundled
beside it as ``models/<name>.half.*`` (the registry's per-resolution weights): its stages are those of the weights it
started from, found by the sha256 in its init record, followed by the run.

A run that started a variant afresh from a sibling's bundled weights (``unireg train --model dp-convic-mf
--init-encoder models/dp-conv-mf.safetensors``) is bundled with ``--from-model dp-conv-mf``: the new card's stages
are then the sibling's stages (each naming the model it trained) followed by the run, and the variant's own earlier
stages leave the card (their run folders stay in ``models/training/``). Bundle such a run before the sibling's own
next stage, while the sibling's card still holds the weights the run started from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

from napari_unireg.models.registry import RESOLUTIONS

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = ("config.yaml", "log.csv", "val.csv")
# Per-stage fields copied from the run's training record (the full config stays in the top-level record).
STAGE_KEYS = ("command", "steps", "wall_time_s", "hardware", "best_step", "date")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def portable_command(command: str, run: Path, cache_dir: str | None, init: tuple[str, str] | None = None) -> str:
    """The command as the README writes it: ``unireg train``, data under ``../shared``, runs under ``runs/``, and
    ``init = (path given, bundled stem)``: the weights it started from as the bundled file they were (a run is
    often started from a copy, so that bundling can replace the file while the run still reads it)."""
    command = re.sub(r"\bpython3? -m napari_unireg\.train\b", "unireg train", command)
    if init is not None and init[0]:
        command = re.sub(rf"(--init-encoder[ =]){re.escape(init[0])}(?=\s|$)", rf"\g<1>models/{init[1]}.safetensors",
                         command)
    if cache_dir:
        command = command.replace(str(Path(cache_dir)), "runs/cache")
    command = command.replace(str(run.resolve()), f"runs/{run.name}")
    return command.replace(str(ROOT.parent / "shared"), "../shared").replace("/work/shared", "../shared")


def target_stem(name: str, resolution: str) -> str:
    """Where a run trained at ``resolution`` is bundled: the main pair ``models/<name>`` when the model has none
    yet or its main pair was trained at that resolution, else ``models/<name>.<resolution>`` (the registry's
    per-resolution weights, ``napari_unireg.models.registry.bundled_weights``)."""
    main = ROOT / "models" / f"{name}.json"
    if not main.is_file() or json.loads(main.read_text()).get("resolution", "full") == resolution:
        return name
    return f"{name}.{resolution}"


def stage_of(training: dict, number: int, what: str, run_folder: str) -> dict:
    stage = {"stage": number, "what": what, "run_folder": run_folder}
    stage.update({k: training[k] for k in STAGE_KEYS if k in training})
    return stage


def _source_stem(init: dict, stems: list[str], run: Path) -> str:
    """The bundled weight file (stem under ``models/``, one of ``stems``) the run started from: the one whose card
    has the sha256 the run's init record holds (whatever the path it was given as), else, for runs exported
    before the record carried a hash, the one with the file name. Refuses any other start."""
    cards = {stem: json.loads((ROOT / "models" / f"{stem}.json").read_text()) for stem in stems
             if (ROOT / "models" / f"{stem}.json").is_file()}
    source = Path(init.get("source", "")).name
    sha = init.get("sha256")
    for stem, card in cards.items():
        if (card.get("sha256") == sha) if sha is not None else (source == f"{stem}.safetensors"):
            return stem
    names = " or ".join(f"{stem}.safetensors" for stem in cards) or f"{stems[0]}.safetensors"
    if sha is not None and source in {f"{stem}.safetensors" for stem in cards}:
        raise SystemExit(f"error: {run} started from other weights than the bundled {source} "
                         f"(sha256 {sha[:12]}…, the card has {cards[source[:-len('.safetensors')]]['sha256'][:12]}…)")
    raise SystemExit(f"error: {run} started from {init.get('source', '')!r}, not from the bundled {names}")


def _stages_of(card: dict, name: str, first_what: str | None) -> list[dict]:
    """The card's training record as stages; the last one gets the sha256 of the card's weights."""
    old = card["training"]
    stages = [dict(s) for s in old.get("stages", [])]
    if not stages:
        if first_what is None:
            raise SystemExit("error: the card has no stages yet; say what its first run was with --first-what")
        # The single run's whole record becomes stage 1: its config and data live nowhere else.
        stages = [{"stage": 1, "what": first_what, "run_folder": f"models/training/{name}", **old}]
    stages[-1]["weights_sha256"] = card["sha256"]
    return stages


def bundle(run: Path, what: str, first_what: str | None = None, dry_run: bool = False,
           from_model: str | None = None) -> dict:
    exports = [p for p in run.glob("*.json") if p.stem != "best"]  # best.json: the best step's copy
    if len(exports) != 1:
        raise SystemExit(f"error: expected one exported card in {run}, found {[p.name for p in exports]}")
    card_new = json.loads(exports[0].read_text())
    name = card_new["name"]
    stem = target_stem(name, card_new.get("resolution", "full"))
    card_path, weights_path = ROOT / "models" / f"{stem}.json", ROOT / "models" / f"{stem}.safetensors"
    init = card_new["training"].get("init", {})
    card_old = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if from_model is None:
        source = _source_stem(init, [name, *(f"{name}.{r}" for r in RESOLUTIONS)], run)
        init_as = (init.get("source", ""), source)
        stages = _stages_of(json.loads((ROOT / "models" / f"{source}.json").read_text()), name, first_what)
    else:
        card_from_path = ROOT / "models" / f"{from_model}.json"
        if not card_from_path.is_file():
            raise SystemExit(f"error: --from-model {from_model}: no bundled card {card_from_path}")
        stages = _stages_of(json.loads(card_from_path.read_text()), from_model, first_what)
        init_as = (init.get("source", ""), _source_stem(init, [from_model], run))
        for s in stages:
            s.setdefault("model", from_model)

    new = dict(card_new["training"])
    cache_dir = new.get("config", {}).get("data", {}).get("cache_dir")
    new["command"] = portable_command(new["command"], run, cache_dir, init_as)
    stages.append(stage_of(new, len(stages) + 1, what, f"models/training/{run.name}"))
    if from_model is not None:
        stages[-1]["model"] = name
    new["stages"] = stages
    new["total_steps"] = sum(int(s["steps"]) for s in stages)
    new["total_wall_time_s"] = round(sum(float(s["wall_time_s"]) for s in stages), 1)
    card_new["training"] = new
    # what was written into the variant's card by hand (``default``, ``notes``, ``trained_on``) is not in an export
    card_new.update({k: v for k, v in card_old.items() if k not in card_new})
    if from_model is None:
        steps = " + ".join(str(s["steps"]) for s in stages)
    else:
        steps = f"{from_model}'s {' + '.join(str(s['steps']) for s in stages[:-1])}, then {stages[-1]['steps']}"
    card_new["description"] = re.sub(r"\(.*steps", f"({steps} steps", card_new["description"], count=1)
    if "steps" not in card_new["description"]:
        card_new["description"] += f" ({steps} steps)"

    writers = {f: run_file_writer(f, new, run, name) for f in RUN_FILES if not (run / f).is_file()}
    for f, writer in writers.items():  # before anything is written: a refused run leaves models/ as it was
        if writer is None:
            raise SystemExit(f"error: {run} holds no {f} (nor what it could be written from)")
    if not dry_run:
        shutil.copyfile(run / f"{name}.safetensors", weights_path)
        card_new["sha256"] = sha256(weights_path)
        card_path.write_text(json.dumps(card_new, indent=1))  # as model_card_metrics.py writes cards
        dest = ROOT / "models" / "training" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in RUN_FILES:
            if f in writers:
                writers[f](dest / f)
            else:
                shutil.copyfile(run / f, dest / f)
    return card_new


def run_file_writer(f: str, training: dict, run: Path, name: str):
    """How to write run file ``f`` that a ``benchmarks/gpu_run.py`` export lacks (a function of the destination
    path), or None when nothing it brought home holds it.

    A lent GPU returns at most 8 files, so ``gpu_run.py`` sends per model only the weights, the card (whose training
    record holds the full config and the validation history) and ``<model>-log.csv``."""
    if f == "log.csv" and (run / f"{name}-log.csv").is_file():
        return lambda dest: shutil.copyfile(run / f"{name}-log.csv", dest)
    if f == "config.yaml" and "config" in training:
        import yaml

        return lambda dest: dest.write_text(yaml.safe_dump(training["config"], sort_keys=False))
    if f == "val.csv" and training.get("val_history"):
        return lambda dest: _write_csv(dest, training["val_history"])
    return None


def _write_csv(dest: Path, rows: list[dict]) -> None:
    import csv

    with open(dest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="run folder of the continued training")
    ap.add_argument("--what", required=True, help="one line: what this stage did")
    ap.add_argument("--first-what", help="what the card's single earlier run did (only when it has no stages)")
    ap.add_argument("--from-model", help="the run started this variant afresh from that bundled model's weights")
    ap.add_argument("--dry-run", action="store_true", help="print the stages, write nothing")
    args = ap.parse_args(argv)
    card = bundle(args.run, args.what, args.first_what, args.dry_run, args.from_model)
    for s in card["training"]["stages"]:
        print(f"stage {s['stage']} ({s.get('model', card['name'])}): {s['steps']} steps, {s['wall_time_s']:.0f} s — {s['command'][:100]}…")
    print(card["description"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
