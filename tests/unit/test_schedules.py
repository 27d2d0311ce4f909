import numpy as np
import pytest

from distsgd.optimizers import schedules as sch


@pytest.mark.parametrize(("schedule", "step", "want"), [
    (sch.InverseTimeDecay(0.5, 1.0, 0.1), 10, 0.25),
    (sch.InverseTimeDecay(1.0, 2.0, 1.0, staircase=True), 3, 0.5),
    (sch.PiecewiseConstantDecay([5], [1.0, 0.5]), 10, 0.5),
    (sch.PiecewiseConstantDecay([5], [1.0, 0.5]), 5, 1.0),
    (sch.PiecewiseConstantDecay([5, 10], [1.0, 0.5, 0.1]), 6, 0.5),
    (sch.PiecewiseConstantDecay([5, 10], [1.0, 0.5, 0.1]), 11, 0.1),
    (sch.ExponentialDecay(0.1, 10, 0.5), 10, 0.05),
    (sch.ExponentialDecay(0.1, 10, 0.5), 5, 0.1 * 0.5 ** 0.5),
    (sch.ExponentialDecay(0.1, 10, 0.5, staircase=True), 19, 0.05),
    (sch.PolynomialDecay(0.1, 10, 0.0), 5, 0.05),
    (sch.PolynomialDecay(0.1, 10, 0.0), 20, 0.0),
    (sch.PolynomialDecay(0.1, 10, 0.01, power=2.0), 5, 0.09 * 0.25 + 0.01),
    (sch.PolynomialDecay(0.1, 10, 0.0, cycle=True), 15, 0.1 * 0.25),
    (sch.PolynomialDecay(0.1, 10, 0.0, cycle=True), 0, 0.1),
])
def test_values(schedule, step, want):
    value = schedule(np.float32(step))
    assert value.dtype == np.float32
    assert float(value) == pytest.approx(want, rel=1e-6)


def test_configs_are_constructor_arguments():
    assert sch.InverseTimeDecay(0.5, 1.0, 0.1).get_config() == {
        "initial_learning_rate": 0.5, "decay_steps": 1.0, "decay_rate": 0.1,
        "staircase": False, "name": None}
    for schedule in (sch.ExponentialDecay(0.1, 3, 0.9, True, "e"),
                     sch.PiecewiseConstantDecay([1, 2], [3.0, 2.0, 1.0], name="p"),
                     sch.PolynomialDecay(0.1, 5, 0.01, 2.0, True, "q")):
        again = sch.deserialize(sch.serialize(schedule))
        assert type(again) is type(schedule) and again.get_config() == schedule.get_config()
        assert again(7) == schedule(7)


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: sch.PiecewiseConstantDecay([1, 2], [1.0]), ValueError, "1 less than"),
    (lambda: sch.PiecewiseConstantDecay([2, 1], [1.0, 2.0, 3.0]), ValueError, "non-decreasing"),
    (lambda: sch.ExponentialDecay(0.1, 0, 0.5), ValueError, "decay_steps=0"),
    (lambda: sch.InverseTimeDecay(float("nan"), 1, 0.5), ValueError, "initial_learning_rate"),
    (lambda: sch.PolynomialDecay("0.1", 1), TypeError, "initial_learning_rate='0.1'"),
    (lambda: sch.deserialize({"class_name": "Nope", "config": {}}), ValueError,
     "Unknown decay: Nope"),
    (lambda: sch.deserialize("x"), ValueError, "expected"),
])
def test_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        sch.LearningRateSchedule()
