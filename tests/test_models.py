"""Tests for the model zoo (kdrun.models): parameter counts, taps, timm path, CLI."""

from __future__ import annotations

import csv
import functools
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import CheckpointError, ConfigError
from kdrun.models import (
    ZOO,
    TapModel,
    count_macs,
    count_params,
    create_model,
    tap_shapes,
    timm_model,
    zoo_cli,
    zoo_model,
)

# Published CIFAR-100 parameter counts in millions (CRD, Tian et al. 2020, and the
# follow-up benchmarks using its code).  resnet14 is listed as 0.17M in some tables,
# but a depth-14 [16, 32, 64] basic-block ResNet has 181,108 parameters (0.18M):
# stem 464 + stages 9,344 / 33,088 / 131,712 + fc 6,500.
PUBLISHED_M = {
    "resnet8": 0.08, "resnet14": 0.18, "resnet20": 0.28, "resnet32": 0.47, "resnet44": 0.67,
    "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43,
    "wrn_16_1": 0.18, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26,
    "vgg8": 3.96, "vgg13": 9.46, "mobilenetv2": 0.81,
    "shufflenetv1": 0.95, "shufflenetv2": 1.36, "resnet50": 23.71,
}
SMALL_TIMM = "mobilenetv3_small_050"


@functools.lru_cache(maxsize=None)
def _model(name: str, num_classes: int = 100, in_chans: int = 3) -> TapModel:
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_chans=in_chans).eval()


@functools.lru_cache(maxsize=None)
def _taps(name: str, num_classes: int, in_chans: int, size: int, preact: bool):
    model = _model(name, num_classes, in_chans)
    x = torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model.forward_taps(x, preact=preact)


def test_zoo_lists_every_family():
    assert len(ZOO) == len(set(ZOO))
    assert set(PUBLISHED_M) <= set(ZOO)
    assert {"vgg11", "vgg16", "vgg19"} <= set(ZOO)
    assert "timm" not in ZOO


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_count_matches_published(name):
    # within 3%, or within the rounding of the two-decimal published figure (resnet8:
    # 83,892 parameters is "0.08M" but 4.9% above 0.08M)
    params = count_params(_model(name)) / 1e6
    published = PUBLISHED_M[name]
    assert abs(params - published) <= max(0.03 * published, 0.005), f"{name}: {params:.4f}M"


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("num_classes,in_chans,size", [(100, 3, 32), (10, 1, 28)])
def test_forward_taps(name, num_classes, in_chans, size):
    model = _model(name, num_classes, in_chans)
    x, taps = _taps(name, num_classes, in_chans, size, False)

    assert model.arch == name and model.num_classes == num_classes and model.in_chans == in_chans
    assert model.supports_preact is True
    assert model.tap_names[0] == "stem"
    assert model.tap_names == ["stem"] + [f"stage{i}" for i in range(1, len(model.tap_names))]
    assert list(taps) == model.tap_names + ["embedding", "logits"]
    if name == "resnet50" or name.startswith(("vgg", "mobilenet")):
        assert len(model.tap_names) == 5
    else:
        assert len(model.tap_names) == 4

    sides = [taps[t].shape[-1] for t in model.tap_names]
    assert all(t.dim() == 4 and t.shape[0] == 2 for t in (taps[n] for n in model.tap_names))
    assert sides == sorted(sides, reverse=True), sides  # spatial size never grows
    assert sides[-1] < size

    assert isinstance(model.classifier, nn.Linear)
    assert model.embedding_dim == model.classifier.in_features
    assert taps["embedding"].shape == (2, model.embedding_dim)
    assert taps["logits"].shape == (2, num_classes)
    with torch.no_grad():
        assert torch.allclose(taps["logits"], model(x), atol=1e-5)

    shapes = tap_shapes(model, in_chans, size)
    assert shapes == {k: tuple(v.shape[1:]) for k, v in taps.items()}


@pytest.mark.parametrize("name", ZOO)
def test_preact_taps(name):
    model = _model(name)
    _, plain = _taps(name, 100, 3, 32, False)
    _, taps = _taps(name, 100, 3, 32, True)
    stages = [n for n in model.tap_names if n.startswith("stage")]
    assert set(taps) == set(plain) | {f"{s}_preact" for s in stages}
    for stage in stages:
        assert torch.allclose(taps[stage], plain[stage])
        pre = taps[f"{stage}_preact"]
        assert pre.shape == taps[stage].shape
        if model.post_activation:
            assert torch.equal(F.relu(pre), taps[stage]), stage
            assert (pre < 0).any(), f"{stage}_preact looks post-ReLU"
        else:  # WRN (pre-activation) and MobileNetV2 (linear bottlenecks)
            assert torch.equal(pre, taps[stage]), stage
    assert model.post_activation == (not name.startswith(("wrn", "mobilenet")))


def test_middle_hint_layer_is_stage2():
    # RepDistiller feature-list convention: stage2 is the middle hint layer
    assert tap_shapes(_model("resnet32x4"), 3, 32)["stage2"] == (128, 16, 16)
    assert tap_shapes(_model("wrn_40_2"), 3, 32)["stage2"] == (64, 16, 16)
    assert tap_shapes(_model("vgg13"), 3, 32)["stage2"] == (256, 8, 8)
    assert tap_shapes(_model("mobilenetv2"), 3, 32)["stage2"] == (16, 8, 8)
    assert tap_shapes(_model("resnet50"), 3, 32)["stage2"] == (512, 16, 16)


def test_vgg_last_pool_only_for_large_inputs():
    model = _model("vgg8")
    assert tap_shapes(model, 3, 32)["stage4"] == (512, 4, 4)
    assert tap_shapes(model, 3, 64)["stage4"] == (512, 4, 4)
    assert tap_shapes(model, 3, 64)["stage3"] == (512, 8, 8)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_smallest_input(name):
    shapes = tap_shapes(_model(name, 10, 1), 1, 16)
    assert shapes["logits"] == (10,)


def test_tap_shapes_restores_training_mode():
    model = create_model("resnet8", num_classes=10)
    assert model.training
    tap_shapes(model, 3, 32)
    assert model.training


def test_count_macs_formula():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.dw(self.conv(x)).mean((2, 3)))

    expected = 8 * 8 * 8 * 3 * 9 + 8 * 4 * 4 * 1 * 9 + 5 * 8
    assert count_macs(Toy(), 3, 8) == expected
    # resnet20 is usually quoted at ~41M MACs on CIFAR
    assert count_macs(_model("resnet20"), 3, 32) == pytest.approx(41e6, rel=0.03)


def test_count_macs_counts_attention():
    class Attention(nn.Module):  # 16 tokens of 3 channels, 2 heads of width 4
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(3, 24)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)
            q, k, v = self.qkv(tokens).reshape(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).sum()

    # qkv: 16 tokens * 24 outputs * 3 inputs; q @ k^T and attn @ v: 2 heads * 16 * 16 * (4 + 4)
    assert count_macs(Attention(), 3, 4) == 16 * 24 * 3 + 2 * 16 * 16 * (4 + 4)
    # a timm ViT at 32x32 (5 tokens, 12 blocks of 3 heads of width 64): its Conv2d/Linear MACs (what the
    # former forward-hook count_macs gave: 27,133,824) plus q @ k^T and attn @ v, fused or explicit
    vit = timm_model("vit_tiny_patch16_224", num_classes=10, image_size=32)
    assert count_macs(vit, 3, 32) == 27_133_824 + 12 * 3 * 5 * 5 * (64 + 64)
    for block in vit.model.blocks:
        block.attn.fused_attn = False
    assert count_macs(vit, 3, 32) == 27_133_824 + 12 * 3 * 5 * 5 * (64 + 64)


def test_zoo_macs_unchanged():
    # conv/linear-only zoo nets: the MACs of the former Conv2d/Linear forward hooks (kdrun-zoo --csv at
    # 3x32x32, 100 classes, before count_macs used FlopCounterMode)
    before = {"resnet8": 12_507_392, "resnet56": 125_753_600, "wrn_16_1": 26_663_168, "vgg8": 96_192_512,
              "mobilenetv2": 6_523_648, "shufflenetv1": 38_691_456, "shufflenetv2": 44_504_448}
    assert {name: count_macs(_model(name), 3, 32) for name in before} == before


def test_timm_registry_has_zoo():
    names = set(timm.list_models("cifar_*"))
    assert {f"cifar_{n}" for n in ZOO} <= names
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    assert isinstance(model, TapModel) and model.arch == "resnet20" and model.num_classes == 10
    assert timm.create_model("cifar_resnet50").classifier.in_features == 2048
    with pytest.raises(ConfigError):
        timm.create_model("cifar_resnet20", pretrained=True)


def test_zoo_models_come_from_timms_registry():
    torch.manual_seed(0)
    from_timm = timm.create_model("cifar_resnet8", num_classes=10)
    torch.manual_seed(0)
    zoo = zoo_model("resnet8", num_classes=10)
    assert type(zoo) is type(from_timm) and zoo.arch == "resnet8"
    assert all(torch.equal(a, b) for a, b in zip(zoo.state_dict().values(), from_timm.state_dict().values()))
    assert timm_model("cifar_resnet8", num_classes=10).arch == "resnet8"  # a TapModel already: not wrapped
    # the builders' name checks, run before anything is built
    zoo_model.check_name("resnet8")
    timm_model.check_name(SMALL_TIMM)
    with pytest.raises(ConfigError, match="did you mean resnet8"):
        zoo_model.check_name("resnet9")
    with pytest.raises(ConfigError, match="unknown timm model"):
        timm_model.check_name("resnet8")


def test_timm_model_taps():
    model = timm_model(SMALL_TIMM, num_classes=10, in_chans=1, image_size=28).eval()
    assert model.arch == f"timm:{SMALL_TIMM}" and model.supports_preact is False
    assert model.num_classes == 10 and model.in_chans == 1
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        taps = model.forward_taps(x)
        logits = model(x)
    assert list(taps) == model.tap_names + ["embedding", "logits"]
    assert model.tap_names[0] == "stem" and model.tap_names[1] == "stage1"
    sides = [taps[n].shape[-1] for n in model.tap_names]
    assert sides == sorted(sides, reverse=True)
    assert taps["embedding"].shape == (2, model.embedding_dim)
    assert model.embedding_dim == model.classifier.in_features
    assert torch.allclose(taps["logits"], logits, atol=1e-5)
    assert tap_shapes(model, 1, 28)["logits"] == (10,)
    with pytest.raises(ConfigError, match=SMALL_TIMM):
        model.forward_taps(x, preact=True)
    # create_model("timm:<name>") is timm_model(<name>)
    assert create_model(model.arch, num_classes=10, in_chans=1).arch == model.arch


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_pretrained_from_local_file(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model(SMALL_TIMM, pretrained=False, num_classes=1000, in_chans=1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)

    model = timm_model(SMALL_TIMM, num_classes=10, in_chans=1, pretrained=str(path))
    target = model.model.state_dict()
    head = {f"{n}.{p}" for n, m in model.model.named_modules() if m is model.classifier for p in ("weight", "bias")}
    for key, value in source.state_dict().items():
        if key in head:
            assert target[key].shape[0] == 10  # 1000-class head skipped
        else:
            assert torch.equal(target[key], value), key


def test_zoo_pretrained_roundtrip(tmp_path):
    source = create_model("resnet8", num_classes=100)
    path = tmp_path / "resnet8.pth"
    torch.save(source.state_dict(), path)
    same = create_model("resnet8", num_classes=100, pretrained=str(path))
    assert torch.equal(same.classifier.weight, source.classifier.weight)
    other = create_model("resnet8", num_classes=10, pretrained=str(path))
    assert other.classifier.out_features == 10
    assert torch.equal(other.stem[0].weight, source.stem[0].weight)
    with pytest.raises(CheckpointError, match="does not fit"):
        create_model("resnet14", num_classes=10, pretrained=str(path))


def test_missing_pretrained_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match="nope.safetensors"):
        create_model("resnet8", num_classes=10, pretrained=str(missing))


def test_unknown_names():
    with pytest.raises(ConfigError) as err:
        create_model("nosuchnet", num_classes=10)
    message = str(err.value)
    assert "'nosuchnet'" in message and "\n" not in message
    assert all(name in message for name in ZOO + ["timm"])
    with pytest.raises(ConfigError, match=r"timm\.list_models\('\*mobilenetv3\*'\)"):
        create_model("timm:mobilenetv3_tiny_999", num_classes=10)
    with pytest.raises(ConfigError, match="needs a name"):
        timm_model("", num_classes=10)
    with pytest.raises(ConfigError, match="'timm'"):
        create_model("timm", num_classes=10)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_chans": 0}, {"image_size": 8}])
def test_bad_sizes(kwargs):
    args = {"num_classes": 10, **kwargs}
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        create_model("resnet8", **args)


def test_zoo_cli_csv(capsys):
    assert zoo_cli.main(["--csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "name,params,macs"
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(out))}
    assert list(rows) == ZOO
    for name, row in rows.items():
        assert int(row["params"]) > 0 and int(row["macs"]) > 0
    assert int(rows["resnet20"]["params"]) == count_params(_model("resnet20"))


def test_zoo_cli_table(capsys, monkeypatch):
    seen = {}

    def fake_rows(num_classes, in_chans, image_size):
        seen.update(num_classes=num_classes, in_chans=in_chans, image_size=image_size)
        return [("resnet20", 278_324, 40_818_944), ("resnet50", 23_705_252, 1_298_014_208)]

    monkeypatch.setattr(zoo_cli, "zoo_rows", fake_rows)
    assert zoo_cli.main(["--num-classes", "10", "--in-chans", "1", "--image-size", "28"]) == 0
    out = capsys.readouterr().out
    assert seen == {"num_classes": 10, "in_chans": 1, "image_size": 28}
    assert "resnet20" in out and "0.28M" in out and "40.8M" in out and "23.71M" in out
    monkeypatch.undo()
    assert zoo_cli.main(["--image-size", "4"]) == 2
    assert "image_size" in capsys.readouterr().err
