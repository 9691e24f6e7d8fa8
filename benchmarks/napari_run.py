"""What a napari user waits for: Run → result layers, Run → metrics, and whether the GUI ever freezes.

A real viewer (run it under ``xvfb-run -a`` without a screen) opens the demo pair from File > Open Sample, docks
the Register widget with its defaults (default model, affine pre-alignment, brain extraction auto), waits while
"the user looks at the inputs" (``--think`` seconds: the widget warms the model meanwhile) and presses Run
``--runs`` times in a row. Per run it prints the wall seconds from the click to

* ``layers``: the warped image, deformation grid and Jacobian layers are in the viewer (the widget shows them as
  soon as the fields are on the fixed grid),
* ``metrics``: the run has finished and its Dice is in the metrics table,

and ``stall``: the longest gap between two ticks of a 20 ms timer in the GUI thread during the run (a frozen
GUI shows up as a long gap). Target (issue 13): layers ≤ 5 s on the second and later runs, no stall.

    xvfb-run -a python benchmarks/napari_run.py --threads 2 --runs 3
    xvfb-run -a python benchmarks/napari_run.py --no-prealign --json bench/napari_run.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

LAYER_KINDS = ("warped", "grid", "jacobian")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="Runs in a row (the first is the cold one)")
    p.add_argument("--think", type=float, default=8.0, help="Seconds between opening the sample and the first Run")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--no-prealign", action="store_true", help="untick affine pre-alignment (the demo pair is in "
                                                                "one space)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import napari
    import torch
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(args.threads)
    from napari_unireg._napari.register_widget import RegisterWidget

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    t_open = time.perf_counter()
    viewer.open_sample("napari-unireg", "demo_pair")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Register", area="right")
    if args.no_prealign:
        widget.chk_prealign.setChecked(False)
    print(f"# sample opened and widget docked in {time.perf_counter() - t_open:.1f} s; model "
          f"{widget.options().model}, prealign {widget.options().prealign}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    def wait(seconds: float) -> None:
        loop = QEventLoop()
        QTimer.singleShot(int(seconds * 1000), loop.quit)
        loop.exec_()

    wait(args.think)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    stages: list[tuple[float, str]] = []  # (time, stage) of the engine's progress messages, as the GUI gets them
    widget._relay.progress.connect(lambda stage, _f: stages.append((time.perf_counter(), stage)))
    rows = []
    for i in range(args.runs):
        seen: dict[str, float] = {}

        def on_inserted(event, seen=seen) -> None:
            name = event.value.name
            for kind in LAYER_KINDS:
                if name.startswith(f"{kind} [") and kind not in seen:
                    seen[kind] = time.perf_counter()

        viewer.layers.events.inserted.connect(on_inserted)
        ticks.clear()
        stages.clear()
        # wait in a Qt event loop, as napari's does (a processEvents/sleep poll would wake the GUI thread 200
        # times a second and take the GIL and the cores from the worker: the user's GUI thread sleeps until an
        # event comes)
        loop = QEventLoop()

        def done(*_args, loop=loop) -> None:
            loop.quit()

        widget.finished.connect(done)
        t0 = time.perf_counter()
        widget.btn_run.click()
        if widget.busy:
            loop.exec_()
        t_end = time.perf_counter()
        widget.finished.disconnect(done)
        app.processEvents()
        viewer.layers.events.inserted.disconnect(on_inserted)
        run = widget.last_run
        if run is None or not all(k in seen for k in LAYER_KINDS):
            print(f"run {i + 1} failed: {widget.lbl_status.text()}", file=sys.stderr)
            return 1
        stamps = [t0, *ticks, t_end]
        gap_start = max(zip(stamps, stamps[1:]), key=lambda ab: ab[1] - ab[0])[0]
        during = [stage for t, stage in stages if t <= gap_start]
        row = {
            "run": i + 1,
            "layers_s": max(seen.values()) - t0,
            "metrics_s": t_end - t0,
            "stall_s": max(b - a for a, b in zip(stamps, stamps[1:])),
            "stall_at_s": gap_start - t0,
            "stall_after_stage": during[-1] if during else "start",
            "dice": run.metrics.get("dice"),
            "engine_seconds": {k: round(v, 2) for k, v in (run.result.seconds or {}).items()},
        }
        rows.append(row)
        print(f"run {i + 1}: layers {row['layers_s']:.2f} s, metrics {row['metrics_s']:.2f} s, longest GUI stall "
              f"{row['stall_s']:.2f} s (at {row['stall_at_s']:.1f} s, in {row['stall_after_stage']}), Dice {row['dice']:.3f}; engine {row['engine_seconds']}", flush=True)
        wait(1.0)
    timer.stop()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": rows, "threads": args.threads, "prealign": not args.no_prealign}, fh, indent=1)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
