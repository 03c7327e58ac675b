"""The real configs compose as the CLI composes them; bad names are one clear line."""

import pytest
from omegaconf import OmegaConf

from kdrun.config import CONF_DIR, check_overrides, compose, group_options, loss_name, model_node
from kdrun.errors import ConfigError


def test_defaults_follow_the_cifar100_recipe():
    cfg = compose([])
    assert cfg.teacher.name == "resnet56" and cfg.student.name == "resnet20"
    assert cfg.dataset.name == "cifar100" and cfg.scheme.name == "offline"
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (240, 64)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.05, 0.9, 5e-4)
    assert list(cfg.sched.milestones) == [150, 180, 210] and cfg.sched.gamma == 0.1
    assert (cfg.loss.kd.temperature, cfg.loss.kd.alpha) == (4.0, 0.9)


def test_combined_loss_terms_compose_in_order():
    cfg = compose(["loss=kd+fitnet", "loss.kd.temperature=2", "loss.fitnet.weight=50"])
    assert list(cfg.loss) == ["kd", "fitnet"]
    assert cfg.loss.kd.temperature == 2 and cfg.loss.fitnet.weight == 50
    assert loss_name(cfg.loss) == "kd+fitnet"
    assert list(compose(["loss=fitnet+kd"]).loss) == ["fitnet", "kd"]


def test_loss_none_is_empty_and_list_form_works():
    assert loss_name(compose(["loss=none"]).loss) == "none"
    assert list(compose(["loss=[kd,fitnet]"]).loss) == ["kd", "fitnet"]


def test_role_keys_live_in_the_root_config():
    # a model config holds the model's own keys; checkpoint, epochs, lr, cache... are the root's
    role_keys = {"checkpoint", "epochs", "lr", "cache", "cache_topk", "cache_dtype"}
    for path in (CONF_DIR / "model").glob("*.yaml"):
        assert not role_keys & set(OmegaConf.load(path)), path.name
    cfg = compose(["teacher=wrn_40_2", "student=mobilenetv2", "teacher.epochs=7"])
    assert role_keys <= set(cfg.teacher) and set(cfg.student) == {"_target_", "name", "lr", "quantize"}
    assert (cfg.teacher.name, cfg.teacher.epochs, cfg.teacher.checkpoint, cfg.student.lr) == ("wrn_40_2", 7, None, None)
    # the CRD recipe's lr 0.01 of MobileNetV2/ShuffleNet students comes from the experiment file
    assert compose(["experiment=cifar100/vgg13_mv2"]).student.lr == 0.01
    assert compose(["experiment=cifar100/vgg13_mv2", "student.lr=0.02"]).student.lr == 0.02
    assert compose(["student=timm", "student.name=resnet18"]).student.pretrained is None


def test_unknown_names_are_one_line_with_the_choices():
    with pytest.raises(ConfigError) as e:
        check_overrides(["student=nosuchnet"])
    msg = str(e.value)
    assert "nosuchnet" in msg and "resnet20" in msg and "wrn_40_2" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"unknown loss term 'nosuch' in 'kd\+nosuch'; valid: .*fitnet.*kd"):
        check_overrides(["loss=kd+nosuch"])
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        check_overrides(["dataset=imagenet"])
    with pytest.raises(ConfigError, match="only loss, teacher options combine with"):
        check_overrides(["student=resnet20+resnet8"])
    with pytest.raises(ConfigError, match="unknown loss term 'bogus'"):
        check_overrides(["-m", "loss=kd,kd+bogus"])


def test_sweep_values_are_split():
    from kdrun.config import chosen_names, parse_override

    def names(text):
        return chosen_names(parse_override(text))

    assert names("loss=kd,kd+fitnet") == ["kd", "kd+fitnet"]
    assert names("loss=[kd,fitnet]") == ["kd", "fitnet"]
    assert names("loss=choice(kd, at)") == ["kd", "at"]
    assert names("loss=glob([kd,d*],exclude=dkd)") == ["dist", "kd"]  # the group's options, sorted


def test_quickstart_experiment_sets_compare_baseline():
    cfg = compose(["experiment=quickstart"])
    assert cfg.compare_baseline is True and cfg.dataset.name == "fashion_mnist_mini"
    assert cfg.teacher.epochs > cfg.trainer.epochs


def test_every_model_config_is_a_teacher_and_student_option():
    from kdrun.models import ZOO

    assert set(ZOO) | {"timm"} == set(group_options("model"))
    for group in ("teacher", "student"):
        assert {o for o in group_options(group) if "+" not in o} == set(group_options("model"))
        assert not list((CONF_DIR / group).glob("**/*.yaml"))  # derived from conf/model: no YAML of their own
    teacher = compose(["teacher=resnet32"]).teacher
    assert model_node("resnet32") == {k: teacher[k] for k in ("_target_", "name")}
    with pytest.raises(ConfigError, match="unknown model 'resnet99'; valid: .*resnet32"):
        model_node("resnet99")
    with pytest.raises(ConfigError, match=r"model 'timm' leaves name unset"):
        model_node("timm")


def test_instantiate_model_passes_what_the_target_takes():
    from kdrun.config import instantiate_model

    node = compose(["teacher=resnet8", "teacher.epochs=3"]).teacher  # role keys beside the model's own
    model = instantiate_model(node, num_classes=7, in_chans=1, image_size=16, unused_by_the_zoo=1)
    assert (model.arch, model.num_classes, model.in_chans) == ("resnet8", 7, 1)
    bad = OmegaConf.create({"_target_": "kdrun.models.no_such_builder", "name": "x"})
    with pytest.raises(ConfigError, match="no_such_builder"):
        instantiate_model(bad, num_classes=7)


def test_run_name_resolver():
    cfg = compose(["loss=kd+fitnet", "dataset=synthetic"])
    from kdrun.config import _run_name

    assert _run_name(_root_=cfg) == "offline_resnet56-resnet20_kd+fitnet_synthetic"
    assert _run_name(_root_=compose(["scheme=baseline", "dataset=synthetic"])) == "baseline_resnet20_synthetic"


def test_several_teachers_and_model_lists():
    cfg = compose(["scheme=multi_teacher", "teacher=resnet56+wrn_40_2"])
    assert cfg.teacher.name == "resnet56+wrn_40_2"
    assert compose(["scheme=multi_teacher", "teacher=[resnet56,vgg13]"]).teacher.name == "resnet56+vgg13"
    with pytest.raises(ConfigError, match="unknown teacher 'nosuch'"):
        check_overrides(["teacher=resnet56+nosuch"])
    with pytest.raises(ConfigError, match=r"unknown model 'resnet99' in ta=\[resnet56,resnet99\]"):
        check_overrides(["ta=[resnet56,resnet99]"])
    with pytest.raises(ConfigError, match="unknown model 'foo' in peers=resnet20\\+foo"):
        check_overrides(["peers=resnet20+foo"])
    assert list(compose(["scheme=mutual", "peers=[resnet20,resnet8]"]).peers) == ["resnet20", "resnet8"]
