import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation, VariableSynchronization


def test_enums_have_tf_spellings_and_values():
    assert [m.name for m in VariableAggregation] == ["NONE", "SUM", "MEAN", "ONLY_FIRST_REPLICA"]
    assert [m.name for m in VariableSynchronization] == ["AUTO", "NONE", "ON_WRITE", "ON_READ"]
    assert VariableAggregation.ONLY_FIRST_REPLICA.value == 3


@pytest.mark.parametrize(("value", "dtype"), [
    (1.0, np.float32), ([1.0, 2.0], np.float32), (3, np.int32),
    (np.float64(1.0), np.float64), (np.zeros(3, np.float16), np.float16),
])
def test_dtype_follows_tf_conversion(value, dtype):
    assert distsgd.Variable(value).dtype == dtype


def test_attributes_and_defaults():
    v = distsgd.Variable(lambda: np.ones((2, 3)), name="w", dtype=np.float64)
    assert (v.name, v.shape, v.dtype, v.trainable) == ("w", (2, 3), np.float64, True)
    assert v.synchronization is VariableSynchronization.AUTO
    assert v.aggregation is VariableAggregation.NONE
    assert distsgd.Variable(1.0).name == "Variable"


def test_numpy_is_a_copy_and_value_is_read_only():
    v = distsgd.Variable([1.0, 2.0])
    copy = v.numpy()
    copy[0] = 9
    assert v.numpy()[0] == 1
    with pytest.raises(ValueError, match="read-only"):
        v.value()[0] = 5
    with pytest.raises(ValueError, match="read-only"):
        np.asarray(v)[0] = 5


def test_assign_family_keeps_storage():
    v = distsgd.Variable([1.0, 2.0])
    storage = v._array
    assert v.assign([3.0, 4.0]) is v
    v.assign_add(np.float32([1, 1]))
    v.assign_sub([0.5, 0.5])
    np.testing.assert_array_equal(v.numpy(), [3.5, 4.5])
    assert v._array is storage


def test_assign_rejects_wrong_shape_and_kind():
    v = distsgd.Variable([1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        v.assign([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="complex"):
        v.assign(np.array([1j, 2j]))
    np.testing.assert_array_equal(v.numpy(), [1, 2])


def test_arithmetic_and_numpy_interop():
    v = distsgd.Variable([1.0, 2.0])
    np.testing.assert_array_equal(v + 1, [2, 3])
    np.testing.assert_array_equal(1 - v, [0, -1])
    np.testing.assert_array_equal(2 * v, [2, 4])
    np.testing.assert_array_equal(v / 2, [0.5, 1])
    np.testing.assert_array_equal(v ** 2, [1, 4])
    np.testing.assert_array_equal(-v, [-1, -2])
    np.testing.assert_array_equal(np.ones(2) * v, [1, 2])
    np.testing.assert_array_equal(np.exp(v), np.exp(np.float32([1.0, 2.0])))
    assert np.dot(v, v) == 5
    assert v[1] == 2 and len(v) == 2
    assert (v > 1).tolist() == [False, True]
    np.testing.assert_array_equal(np.asarray(v), [1, 2])
    assert float(distsgd.Variable(3.0)) == 3.0


def test_on_read_trainable_is_refused_and_defaults_to_non_trainable():
    with pytest.raises(ValueError, match="ON_READ only for non-trainable"):
        distsgd.Variable(0.0, trainable=True, synchronization=VariableSynchronization.ON_READ)
    metric = distsgd.Variable(0.0, synchronization=VariableSynchronization.ON_READ,
                              aggregation=VariableAggregation.SUM)
    assert metric.trainable is False


@pytest.mark.parametrize(("kwargs", "error"), [
    (dict(synchronization="ON_READ"), TypeError),
    (dict(aggregation=1), TypeError),
    (dict(dtype="not-a-dtype"), TypeError),
    (dict(constraint=3), TypeError),
])
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        distsgd.Variable(1.0, **kwargs)


def test_object_values_are_refused():
    with pytest.raises(TypeError, match="not numeric"):
        distsgd.Variable([object()])


def test_indexed_slices_repr_and_fields():
    s = distsgd.IndexedSlices(np.ones((2, 3)), [0, 4], (5, 3))
    assert s.dense_shape == (5, 3)
    assert "indices=[0 4]" in repr(s)
