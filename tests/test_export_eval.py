"""The student leaves the lab: safetensors + model card at the end of a run (and for stored teachers),
``kdrun-export`` (ONNX, TorchScript, the compression report) and ``kdrun-eval``."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import pytest
import torch

import kdrun
from kdrun.config import compose
from kdrun.engine.checkpoint import read_checkpoint, read_weights
from kdrun.errors import ConfigError
from kdrun.evaluate import ece_of, evaluate
from kdrun.models import count_params, create_model
from kdrun.run import run
from tests.conftest import tiny


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    """One offline KD run (its teacher trained into the store): (run dir, summary, overrides)."""
    root = tmp_path_factory.mktemp("kd")
    ov = tiny(root, "trainer.limit_train_batches=3")
    summary = run(compose(ov), run_dir=root / "run", overrides=ov)
    assert summary["status"] == "ok"
    return root / "run", summary, ov


def test_the_student_and_the_stored_teacher_ship_as_safetensors_with_a_card(kd_run):
    run_dir, summary, _ = kd_run
    shipped = read_weights(run_dir / "student.safetensors")
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert shipped["state_dict"].keys() == best["state_dict"].keys()
    assert all(torch.equal(shipped["state_dict"][k], best["state_dict"][k]) for k in best["state_dict"])
    card = json.loads((run_dir / "student.json").read_text())
    assert card == shipped["card"]  # the sidecar and the file's own metadata agree
    assert (card["arch"], card["num_classes"], card["in_chans"], card["image_size"]) == ("resnet8", 10, 3, 16)
    assert card["model"]["_target_"] == "kdrun.models.zoo_model" and card["model"]["name"] == "resnet8"
    assert "lr" not in card["model"] and "checkpoint" not in card["model"]  # role keys are the run's
    assert card["top1"] == summary["student_top1_best"] and card["kdrun_version"] == kdrun.__version__
    from kdrun.data import build_data

    info = build_data(compose(kd_run[2]).dataset, batch_size=32).info
    assert card["input"]["mean"] == pytest.approx(list(info.mean)) and card["input"]["std"] == pytest.approx(list(info.std))
    model = create_model("resnet8", 10, 3, 16)
    model.load_state_dict(shipped["state_dict"])  # loads into a plain model built from the card
    teacher_dir = (run_dir.parent / summary["teacher_source"]).resolve().parent
    stored = read_weights(teacher_dir / "model.safetensors")
    pt = read_checkpoint(teacher_dir / "model.pt")
    assert all(torch.equal(stored["state_dict"][k], pt["state_dict"][k]) for k in pt["state_dict"])
    assert json.loads((teacher_dir / "model.json").read_text())["arch"] == "resnet8"


def test_eval_of_a_run_dir_prints_the_summary_top1(kd_run, capsys):
    from kdrun.evaluate import main

    run_dir, summary, _ = kd_run
    main([str(run_dir)])
    out = capsys.readouterr().out
    assert f"{summary['student_top1_best']:.2f}" in out and "(the same)" in out
    result = evaluate(str(run_dir))
    assert result["student_top1"] == pytest.approx(summary["student_top1_best"], abs=1e-6)
    assert result["student_top5"] == pytest.approx(summary["student_top5_best"], abs=1e-6)
    assert result["teacher_top1"] == pytest.approx(summary["teacher_top1"], abs=1e-6)
    assert 0.0 <= result["agreement"] <= 100.0 and 0.0 <= result["student_ece"] <= 1.0
    # the student against itself as the teacher: full agreement, the same scores
    same = evaluate(str(run_dir), teacher=str(run_dir / "checkpoints" / "best.pt"))
    assert same["agreement"] == 100.0 and same["teacher_top1"] == same["student_top1"]
    assert same["teacher_ece"] == same["student_ece"]


def test_eval_of_a_lone_checkpoint_needs_its_dataset(kd_run, tmp_path):
    run_dir, summary, ov = kd_run
    lone = tmp_path / "student.safetensors"
    shutil.copy(run_dir / "student.safetensors", lone)  # the card rides in the file's metadata
    with pytest.raises(ConfigError, match="dataset=cifar100"):
        evaluate(str(lone))
    data = [o for o in ov if o.startswith(("dataset", "trainer."))]
    assert evaluate(str(lone), data)["student_top1"] == pytest.approx(summary["student_top1_best"], abs=1e-6)


def test_eval_and_export_of_a_path_that_is_no_run_are_one_line(tmp_path, capsys):
    from kdrun import evaluate as evaluate_mod
    from kdrun import export as export_mod

    for main, name in ((evaluate_mod.main, "kdrun-eval"), (export_mod.main, "kdrun-export")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "nothing")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{name}: error: ") and "nothing" in err[0]


def test_parity_ece_equals_torchmetrics():
    # torchmetrics 1.9.0 (PyPI), torchmetrics/functional/classification/calibration_error.py,
    # multiclass_calibration_error(logits.softmax(1), target, num_classes=10, n_bins=15, norm="l1")
    # on these seeded tensors (run outside the project): 0.20430158078670502
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=g) * 3
    target = torch.randint(0, 10, (300,), generator=g)
    target[:150] = logits[:150].argmax(1)
    assert ece_of(logits, target) == pytest.approx(0.20430158078670502, abs=1e-6)


def shipped_student(run_dir):
    model = create_model("resnet8", 10, 3, 16).eval()
    model.load_state_dict(read_weights(run_dir / "student.safetensors")["state_dict"])
    return model


@pytest.mark.parametrize("exporter", ["dynamo", "classic"])
def test_onnx_exporters_match_pytorch(kd_run, tmp_path, exporter):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime

    from kdrun.export import export_onnx

    model = shipped_student(kd_run[0])
    export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "s.onnx", exporter)
    session = onnxruntime.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)  # another batch size than the export's example: the batch axis is dynamic
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(got), model(x).detach(), atol=1e-4)


def test_export_onnx_writes_the_file_and_the_compression_report(kd_run, capsys):
    pytest.importorskip("onnxruntime")
    from kdrun.export import main

    run_dir, summary, _ = kd_run
    main([str(run_dir), "--format", "onnx", "--exporter", "classic", "--repeats", "3"])
    out = capsys.readouterr().out
    diff = float(out.split("max |onnx - pytorch| on a batch of 8: ")[1].split()[0])
    assert 0 <= diff < 1e-4 and (run_dir / "student.onnx").is_file()
    model = shipped_student(run_dir)
    with open(run_dir / "compression.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"teacher", "student"}
    assert int(rows["student"]["params"]) == count_params(model)
    assert float(rows["student"]["top1"]) == pytest.approx(summary["student_top1_best"], abs=0.01)
    assert float(rows["teacher"]["latency_ms"]) > 0 and float(rows["student"]["exported_mb"]) > 0
    assert "| teacher / student |" in (run_dir / "compression.md").read_text()


def test_export_torchscript(kd_run, capsys):
    from kdrun.export import main

    run_dir, _, _ = kd_run
    main([str(run_dir), "--format", "torchscript", "--repeats", "2"])
    assert "max |torchscript - pytorch| on a batch of 8: 0" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        scripted = torch.jit.load(str(run_dir / "student.pt"))
    model = shipped_student(run_dir)
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(scripted(x), model(x), atol=1e-5)
