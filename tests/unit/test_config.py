import json

import numpy as np
import pytest

import distsgd
from distsgd import optimizers
from distsgd.optimizers import SGD
from distsgd.optimizers import schedules as sch


def test_default_config():
    assert SGD().get_config() == {"name": "SGD", "learning_rate": 0.01, "decay": 0.0,
                                  "momentum": 0.0, "nesterov": False}


def test_config_key_order_and_clip_keys_only_when_set():
    config = SGD(0.1, momentum=0.9, nesterov=True, clipnorm=1.0, clipvalue=0.5,
                 decay=0.01).get_config()
    assert list(config) == ["name", "clipnorm", "clipvalue", "learning_rate", "decay",
                            "momentum", "nesterov"]
    assert "global_clipnorm" in SGD(global_clipnorm=2.0).get_config()


def test_after_hypers_exist_values_are_float32_rounded():
    opt = SGD(0.1, momentum=0.9)
    opt.lr  # noqa: B018 (reading creates the hyper variables, as in TF)
    config = opt.get_config()
    assert config["learning_rate"] == float(np.float32(0.1))
    assert config["momentum"] == float(np.float32(0.9))


def test_callable_serializes_its_current_value():
    assert SGD(lambda: 0.25).get_config()["learning_rate"] == 0.25


@pytest.mark.parametrize("kwargs", [
    {}, dict(learning_rate=0.3, momentum=0.9, nesterov=True), dict(lr=0.3),
    dict(decay=0.01, clipvalue=0.5, clipnorm=2.0), dict(global_clipnorm=1.5),
    dict(learning_rate=sch.InverseTimeDecay(0.5, 1.0, 0.1)),
    dict(learning_rate=sch.PiecewiseConstantDecay([5], [1.0, 0.5])),
    dict(learning_rate=sch.ExponentialDecay(0.1, 10, 0.96, staircase=True)),
    dict(learning_rate=sch.PolynomialDecay(0.1, 100, 0.001, power=2.0, cycle=True)),
])
@pytest.mark.parametrize("after_step", [False, True])
def test_round_trip_is_json_equal(kwargs, after_step):
    opt = SGD(**kwargs)
    if after_step:
        opt.minimize(lambda: 3 * var, [var := distsgd.Variable([[1.0], [2.0]])])
    config = opt.get_config()
    assert json.loads(json.dumps(config)) == config
    again = SGD.from_config(config)
    assert again.get_config() == config
    assert again.nesterov == opt.nesterov and again._momentum == opt._momentum


@pytest.mark.parametrize(("schedule", "want"), [
    (sch.InverseTimeDecay(0.5, decay_steps=1.0, decay_rate=0.1), 0.25),
    (sch.PiecewiseConstantDecay([5], [1.0, 0.5]), 0.5),
])
def test_schedule_survives_round_trip(schedule, want):
    opt = SGD.from_config(SGD(schedule).get_config())
    assert opt._get_hyper("learning_rate")(10) == pytest.approx(want)


class MySchedule(sch.LearningRateSchedule):
    def __init__(self, rate):
        self.rate = rate

    def __call__(self, step):
        return np.float32(self.rate)

    def get_config(self):
        return {"rate": self.rate}


def test_custom_schedule_needs_custom_objects():
    config = SGD(MySchedule(0.2)).get_config()
    assert config["learning_rate"] == {"class_name": "MySchedule", "config": {"rate": 0.2}}
    with pytest.raises(ValueError, match="Unknown decay: MySchedule"):
        SGD.from_config(config)
    opt = SGD.from_config(config, custom_objects={"MySchedule": MySchedule})
    assert isinstance(opt._get_hyper("learning_rate"), MySchedule)


def test_from_config_lr_key_and_caller_dict_untouched():
    config = {"lr": 0.2, "name": "SGD"}
    assert SGD.from_config(config).get_config()["learning_rate"] == 0.2
    assert config == {"lr": 0.2, "name": "SGD"}


def test_from_config_unknown_key_is_type_error():
    with pytest.raises(TypeError, match="Unexpected keyword argument passed to optimizer: bad"):
        SGD.from_config({"bad": 1})


def test_serialize_deserialize_get():
    opt = SGD(0.3, momentum=0.5)
    assert optimizers.serialize(opt) == {"class_name": "SGD", "config": opt.get_config()}
    assert optimizers.deserialize(optimizers.serialize(opt)).get_config() == opt.get_config()
    assert optimizers.get("sgd").get_config()["learning_rate"] == 0.01
    assert optimizers.get("SGD").get_config()["learning_rate"] == 0.01
    assert optimizers.get(opt) is opt
    with pytest.raises(ValueError, match="Could not interpret optimizer identifier"):
        optimizers.get(42)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        optimizers.get("adam")
