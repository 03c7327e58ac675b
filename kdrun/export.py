"""``kdrun-export RUN_DIR [--format onnx|torchscript]``: ship a run's student, and the compression report.

Writes the student of the run's best epoch as ``<run dir>/student.onnx`` (torch.onnx.export's
dynamo exporter, a dynamic batch axis) or ``student.pt`` (TorchScript, ``torch.jit.trace``),
checks the file's outputs against PyTorch's on a batch of inputs (the largest absolute difference
is printed), and times batch-1 inference of the teacher and the student side by side on this
machine (ONNX Runtime for onnx, the TorchScript modules for torchscript). Then the compression
report, printed and written as ``compression.md`` and ``compression.csv`` in the run dir: params,
MACs, size on disk, latency and top-1 of teacher and student, and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kdrun.errors import CheckpointError, ConfigError, KdrunError, OneLineParser, require_extra
from kdrun.models import latency_ms

#: the packages each format needs: (module, kdrun extra)
NEEDS = {"onnx": [("onnx", "export"), ("onnxscript", "export"), ("onnxruntime", "export")], "torchscript": []}
FILES = {"onnx": "student.onnx", "torchscript": "student.pt"}


# ---------------------------------------------------------------------------- the run's models
def check_packages(fmt: str) -> None:
    for module, extra in NEEDS[fmt]:
        require_extra(f"--format {fmt}", module, extra)


def load_run(run_dir: str) -> tuple[Path, object, dict]:
    """(run dir, its config, its summary); a path that is no run dir is one line."""
    from omegaconf import OmegaConf

    from kdrun.runtime.shipping import read_summary

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{run_dir}: no such run dir; give a run dir (outputs/runs/<date>/<time>_...)")
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a kdrun run dir (no config.yaml)")
    return path.resolve(), OmegaConf.load(path / "config.yaml"), read_summary(path)


def student_file(run_dir: Path) -> Path:
    """student.safetensors (written at the end of every run), else checkpoints/best.pt (older runs)."""
    from kdrun.runtime.shipping import student_weights

    shipped = run_dir / "student.safetensors"
    return shipped if shipped.is_file() else student_weights(run_dir)


def input_shape(run_dir: Path, cfg) -> tuple[int, int, int]:
    """(channels, height, width) of the run's images: from student.json, else from its data."""
    import json

    card = run_dir / "student.json"
    if card.is_file():
        meta = json.loads(card.read_text())
        size = meta["image_size"]
    else:
        from kdrun.data import build_data

        info = build_data(cfg.dataset, batch_size=int(cfg.trainer.batch_size), channels_last=False).info
        meta, size = {"in_chans": info.in_chans}, info.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return int(meta["in_chans"]), int(height), int(width)


def run_models(run_dir: Path, cfg, summary: dict, shape) -> dict:
    """{"teacher": (model, weights file), "student": (...)} on the CPU in eval mode (the teacher where
    the run had one and its weights are still on disk)."""
    from kdrun.runtime.shipping import load_model, teacher_weights

    size = shape[1] if shape[1] == shape[2] else shape[1:]
    models = {}
    teacher = teacher_weights(run_dir, summary)
    if teacher is not None and "+" not in str(cfg.teacher.get("name", "")):
        models["teacher"] = (load_model(teacher, cfg.teacher, size, role="teacher"), teacher)
    elif summary.get("teacher"):
        print(f"teacher: its weights ({summary.get('teacher_source')}) are not on disk; the student alone",
              flush=True)
    weights = student_file(run_dir)
    models["student"] = (load_model(weights, cfg.student, size, role="student"), weights)
    return models


# ---------------------------------------------------------------------------- formats
def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str = "dynamo") -> Callable:
    """``model`` as ONNX at ``path`` (batch axis dynamic) by torch.onnx.export's ``dynamo`` exporter
    (torch.export; the graph left for ONNX Runtime to optimise) or its ``classic`` TorchScript-based
    one (faster to export, deprecated by PyTorch); returns a batch-in, logits-out function that runs
    the file with ONNX Runtime."""
    import warnings

    import onnxruntime

    names = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter == "dynamo":
        how = {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},),
               "external_data": False, "optimize": False}
    else:
        how = {"dynamo": False, "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
    with warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), verbose=False, **names, **how)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(np.asarray(session.run(None, {name: x.numpy()})[0]))


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str = "") -> Callable:
    """``model`` traced to TorchScript at ``path``; returns the loaded module."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return loaded.eval()


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


class _quiet_stdout:
    """The dynamo exporter prints its progress on stdout: keep it for errors only."""

    def __enter__(self):
        self.saved, sys.stdout = sys.stdout, io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self.saved
        return False


# ---------------------------------------------------------------------------- the command
def export(run_dir: str, fmt: str = "onnx", batch: int = 8, repeats: int = 50, exporter: str = "dynamo") -> dict:
    """Export the student, check it, time teacher and student, write the compression report."""
    check_packages(fmt)
    path, cfg, summary = load_run(run_dir)
    shape = input_shape(path, cfg)
    models = run_models(path, cfg, summary, shape)
    generator = torch.Generator().manual_seed(0)
    check = torch.randn(batch, *shape, generator=generator)
    one = check[:1].clone()
    student, _ = models["student"]
    out = path / FILES[fmt]
    runner = EXPORTERS[fmt](student, one, out, exporter)
    with torch.inference_mode():
        diff = float((runner(check).float() - student(check).float()).abs().max())
    print(f"wrote {out} ({fmt}); max |{fmt} - pytorch| on a batch of {batch}: {diff:.3g}", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for role, (model, weights) in models.items():
            exported = out if role == "student" else Path(scratch) / f"{role}{out.suffix}"
            run = runner if role == "student" else EXPORTERS[fmt](model, one, exported, exporter)
            latency = latency_ms(run, one, repeats, warmup=max(10, repeats // 5))
            rows[role] = report_row(role, model, weights, exported, latency, summary, shape)
    runtime = "onnxruntime (CPU)" if fmt == "onnx" else f"torchscript on {torch.get_num_threads()} threads"
    note = f"batch-1 latency: median of {repeats} runs, {runtime}, {os.cpu_count()} CPU cores"
    write_report(path, rows, note)
    return {"file": str(out), "max_abs_diff": diff, "rows": rows, "note": note}


def _mb(path: Path) -> float:
    return os.path.getsize(path) / 1e6


def report_row(role: str, model, weights: Path, exported: Path, latency: float, summary: dict, shape) -> dict:
    """One model's line of the compression report."""
    from kdrun.models import count_macs, count_params

    portable = weights.with_name("model.safetensors") if role == "teacher" else weights
    on_disk = portable if portable.is_file() else weights
    macs = count_macs(model, shape[0], shape[1]) if shape[1] == shape[2] else summary.get(f"{role}_macs")
    top1 = summary.get("student_top1_best" if role == "student" else "teacher_top1")
    return {"model": role, "arch": getattr(model, "arch", type(model).__name__), "params": count_params(model),
            "macs": macs, "weights_mb": round(_mb(on_disk), 3), "weights_file": on_disk.name,
            "exported_mb": round(_mb(exported), 3), "latency_ms": round(latency, 3),
            "top1": None if top1 is None else round(float(top1), 2)}


def report_table(rows: dict) -> list[list[str]]:
    """The report's cells: a header, one line per model, and teacher / student where both are there."""
    head = ["model", "arch", "params", "MACs", "weights (MB)", "exported (MB)", "latency (ms)", "top-1"]
    lines = [head]
    for r in rows.values():
        lines.append([r["model"], r["arch"], f"{r['params'] / 1e6:.3f}M",
                      "-" if r["macs"] is None else f"{r['macs'] / 1e6:.1f}M", f"{r['weights_mb']:.3f}",
                      f"{r['exported_mb']:.3f}", f"{r['latency_ms']:.3f}", "-" if r["top1"] is None else f"{r['top1']:.2f}"])
    if "teacher" in rows:
        t, s = rows["teacher"], rows["student"]

        def ratio(key):
            return "-" if not (t[key] and s[key]) else f"{t[key] / s[key]:.2f}x"

        gap = "-" if t["top1"] is None or s["top1"] is None else f"{s['top1'] - t['top1']:+.2f}"
        lines.append(["teacher / student", "", ratio("params"), ratio("macs"), ratio("weights_mb"),
                      ratio("exported_mb"), ratio("latency_ms"), gap])
    return lines


def write_report(run_dir: Path, rows: dict, note: str) -> None:
    """Print the report; write compression.md (the table) and compression.csv (one row per model)."""
    from kdrun.engine.io import write_text

    lines = report_table(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for k, line in enumerate(lines):
        print("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print(note)
    md = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    md += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    write_text(run_dir / "compression.md", "\n".join(md) + f"\n\n{note}\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(next(iter(rows.values()))))
    writer.writeheader()
    writer.writerows(rows.values())
    write_text(run_dir / "compression.csv", buf.getvalue())
    print(f"wrote {run_dir / 'compression.md'}, {run_dir / 'compression.csv'}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kdrun-export", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run dir (outputs/runs/<date>/<time>_...)")
    parser.add_argument("--format", choices=sorted(EXPORTERS), default="onnx", help="onnx (default) or torchscript")
    parser.add_argument("--exporter", choices=("dynamo", "classic"), default="dynamo",
                        help="torch.onnx.export's exporter for onnx: dynamo (default) or classic (TorchScript-based)")
    parser.add_argument("--batch", type=int, default=8, help="inputs in the output check (default: 8)")
    parser.add_argument("--repeats", type=int, default=50, help="timed batch-1 runs per model (default: 50)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.batch < 1 or args.repeats < 1:
            raise ConfigError(f"--batch {args.batch} --repeats {args.repeats}: both must be >= 1")
        export(args.run_dir, args.format, args.batch, args.repeats, args.exporter)
    except (KdrunError, CheckpointError) as exc:
        print(f"kdrun-export: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
