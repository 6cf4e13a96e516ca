"""BatchNormConfig: Keras defaults, get_config() round trips, and every refusal naming its argument."""

import json

import numpy as np
import pytest

from bncompile import BatchNormConfig, ConfigError
from bncompile.config import FUSED_MIN_EPSILON

# What tf.keras 2.15's BatchNormalization().get_config() returns (JSON-loaded).
KERAS_DEFAULT = {
    "name": "batch_normalization", "trainable": True, "dtype": "float32", "axis": [-1], "momentum": 0.99,
    "epsilon": 0.001, "center": True, "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                          "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                                "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                                    "registered_name": None},
    "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None,
}


def test_defaults_are_keras():
    c = BatchNormConfig()
    assert (c.axis, c.momentum, c.epsilon, c.center, c.scale) == (-1, 0.99, 1e-3, True, True)
    assert (c.renorm, c.renorm_clipping, c.renorm_momentum, c.fused, c.trainable) == (False, None, 0.99, None, True)
    assert c.virtual_batch_size is None and c.adjustment is None
    assert c.gamma_initializer["class_name"] == "Ones" and c.moving_variance_initializer["class_name"] == "Ones"


def test_from_keras_default_config():
    c = BatchNormConfig.from_keras(json.loads(json.dumps(KERAS_DEFAULT)))
    assert c.axis == (-1,) and c.momentum == 0.99
    assert c.resolve(4).axes == (3,)


def test_from_keras_wrapper_and_full_arguments():
    d = {**KERAS_DEFAULT, "axis": [1, 3], "renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5},
         "renorm_momentum": 0.9, "gamma_regularizer": {"class_name": "L2", "config": {"l2": 0.01}},
         "beta_constraint": {"class_name": "NonNeg", "config": {}},
         "moving_variance_initializer": {"class_name": "RandomUniform",
                                         "config": {"minval": 0.5, "maxval": 2.0, "seed": 3}}}
    c = BatchNormConfig.from_keras({"class_name": "BatchNormalization", "config": d})
    assert c.axis == (1, 3) and c.renorm_clipping == {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}
    assert c.gamma_regularizer == {"class_name": "L2", "config": {"l2": 0.01}}
    v = c.initial_variables([4, 3, 5, 6])
    assert v["moving_variance"].shape == (1, 3, 1, 6)
    assert np.all((v["moving_variance"] >= 0.5) & (v["moving_variance"] <= 2.0))
    # seeded initializers repeat; renorm stddevs start at sqrt(moving_variance) (no eps)
    np.testing.assert_array_equal(v["moving_variance"], c.initial_variables([4, 3, 5, 6])["moving_variance"])
    np.testing.assert_allclose(v["renorm_stddev"], np.sqrt(v["moving_variance"]))
    np.testing.assert_allclose(v["moving_stddev"], np.sqrt(v["moving_variance"]))
    np.testing.assert_array_equal(v["renorm_mean"], v["moving_mean"])


@pytest.mark.parametrize("name,init", [
    ("zeros", 0.0), ("ones", 1.0), ({"class_name": "Constant", "config": {"value": 2.5}}, 2.5),
])
def test_constant_initializers(name, init):
    c = BatchNormConfig(gamma_initializer=name)
    np.testing.assert_array_equal(c.initial_variables([2, 7])["gamma"], np.full(7, init))


@pytest.mark.parametrize("spec", [
    {"class_name": "RandomNormal", "config": {"mean": 1.0, "stddev": 0.1, "seed": 1}},
    {"class_name": "TruncatedNormal", "config": {"mean": 0.0, "stddev": 1.0, "seed": 2}},
    "random_uniform",
])
def test_random_initializers(spec):
    c = BatchNormConfig(beta_initializer=spec)
    b = c.initial_variables([2, 4000])["beta"]
    assert b.std() > 0
    if isinstance(spec, dict) and spec["class_name"] == "TruncatedNormal":
        assert np.abs(b).max() <= 2.0


def test_weights_any_shape_c_order():
    c = BatchNormConfig(axis=[1, 2])
    w = np.arange(6.0)
    v = c.initial_variables([2, 2, 3, 4], {"gamma": w.reshape(2, 3)})
    np.testing.assert_array_equal(v["gamma"].reshape(-1), w)
    with pytest.raises(ConfigError, match="weights"):
        c.initial_variables([2, 2, 3, 4], {"gamma": np.ones(5)})
    with pytest.raises(ConfigError, match="weights"):
        c.initial_variables([2, 2, 3, 4], {"gama": np.ones(6)})
    # a Keras variable the config does not have is ignored (Keras would never read it)
    v = BatchNormConfig(scale=False).initial_variables([2, 3], {"gamma": np.ones(3), "renorm_mean": np.ones(3)})
    assert set(v) == {"beta", "moving_mean", "moving_variance"}


@pytest.mark.parametrize("rank,axis,fused,expect", [
    (4, 1, None, True), (4, -1, None, True), (4, 3, None, True), (5, 1, None, True), (5, -1, None, True),
    (5, 2, None, False), (5, 3, None, False),  # rank 5 with another axis falls back silently
    (4, 2, None, False), (3, -1, None, False), (2, -1, None, False), (4, [1, 3], None, False),
    (4, 1, False, False), (4, 1, True, True), (5, 4, True, True),
])
def test_fused_path_selection(rank, axis, fused, expect):
    res = BatchNormConfig(axis=axis, fused=fused).resolve(rank)
    assert res.fused is expect
    assert res.epsilon == (max(1e-3, FUSED_MIN_EPSILON) if expect else 1e-3)


def test_fused_epsilon_clamp():
    assert BatchNormConfig(axis=1, epsilon=1e-6).resolve(4).epsilon == FUSED_MIN_EPSILON
    assert BatchNormConfig(axis=1, epsilon=1e-6, fused=False).resolve(4).epsilon == 1e-6


def test_non_trainable_means_inference():
    from bncompile.config import training_effective
    assert training_effective(BatchNormConfig(trainable=False), True) is False


@pytest.mark.parametrize("kwargs,rank,argument", [
    (dict(virtual_batch_size=2, adjustment="inputs"), 4, "virtual_batch_size"),
    (dict(virtual_batch_size=0), 4, "virtual_batch_size"),
    (dict(virtual_batch_size=-3), 4, "virtual_batch_size"),
    (dict(virtual_batch_size=2, axis=0), 4, "axis"),
    (dict(virtual_batch_size=2, axis=[0, 1]), 4, "axis"),
    (dict(virtual_batch_size=2, axis=-4), 4, "axis"),
    (dict(renorm=True, renorm_clipping={"rmax": 2, "foo": 1}), 4, "renorm_clipping"),
    (dict(axis=4), 4, "axis"), (dict(axis=-5), 4, "axis"), (dict(axis=[1, 1]), 4, "axis"),
    (dict(axis=[1, -3]), 4, "axis"), (dict(axis=[]), 4, "axis"), (dict(axis="1"), 4, "axis"),
    (dict(fused=True, renorm=True), 4, "fused"), (dict(fused=True, axis=2), 4, "fused"),
    (dict(fused=True, virtual_batch_size=2), 4, "fused"), (dict(fused=True, adjustment="inputs"), 4, "fused"),
    (dict(fused=True, axis=[1, 3]), 4, "fused"), (dict(fused=True), 3, "fused"), (dict(fused=True), 2, "fused"),
    (dict(axis=-4), 4, "axis"),  # Keras quirk: resolves to 0 after the constructor's check, refused in build()
    (dict(epsilon=-1e-3), 4, "epsilon"), (dict(momentum="a"), 4, "momentum"),
    (dict(center="yes"), 4, "center"), (dict(adjustment=lambda s: s), 4, "adjustment"),
    (dict(gamma_initializer="he_unknown"), 4, "gamma_initializer"),
    (dict(beta_initializer={"class_name": "RandomUniform", "config": {"minval": 1, "maxval": 0}}), 4,
     "beta_initializer"),
])
def test_invalid_configs_name_the_argument(kwargs, rank, argument):
    with pytest.raises(ConfigError) as err:
        BatchNormConfig(**kwargs).resolve(rank)
    assert argument in str(err.value)


def test_from_keras_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown"):
        BatchNormConfig.from_keras({**KERAS_DEFAULT, "bogus": 1})


def test_cli_turns_config_error_into_one_line(capsys):
    from bncompile.cli import main
    rc = main(["build", "--input-shape", "8,4", "--virtual-batch-size", "2", "--adjustment", "inputs"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "virtual_batch_size" in err


def test_keras_accepts_what_it_never_checks():
    # epsilon 0 (the fused path clamps it), clipping keys without renorm (ignored), negative dmax
    assert BatchNormConfig(epsilon=0.0).resolve(4).epsilon == FUSED_MIN_EPSILON
    assert BatchNormConfig(epsilon=0.0, fused=False).resolve(4).epsilon == 0.0
    assert BatchNormConfig(renorm=False, renorm_clipping={"foo": 1}).renorm_clipping is None
    assert BatchNormConfig(renorm=True, renorm_clipping={"dmax": -1}).renorm_clipping == {"dmax": -1.0}


def test_float64_layers_never_fuse():
    assert BatchNormConfig().resolve(4, "float64").fused is False
    assert BatchNormConfig().resolve(4, "float32").fused is True
    with pytest.raises(ConfigError, match="fused"):
        BatchNormConfig(fused=True).resolve(4, "float64")


def test_constant_initializer_with_a_list():
    c = BatchNormConfig(gamma_initializer={"class_name": "Constant", "config": {"value": [1.0, 2.0, 3.0]}})
    np.testing.assert_array_equal(c.initial_variables([2, 3])["gamma"], [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="Constant"):
        c.initial_variables([2, 4])


# ---- Keras's built form of a virtual_batch_size layer's axis (issue 13, item 6)

@pytest.mark.parametrize("saved, rank, want", [([4], 4, (3,)), ([2], 4, (1,)), ([2, 4], 4, (1, 3)),
                                               ([2], 2, (1,)), ([3, 4], 5, (2, 3))])
def test_from_keras_reads_the_built_ghost_axis(saved, rank, want):
    """Keras 2's build() shifts a ghost layer's axis by one (made non-negative first); get_config()
    returns that, and Keras's own from_config() then fails on it. We read it back."""
    c = BatchNormConfig.from_keras({**KERAS_DEFAULT, "axis": saved, "virtual_batch_size": 2})
    assert c.axis == want
    assert c.resolve(rank).axes == want


def test_from_keras_keeps_an_unbuilt_ghost_axis_and_our_own_round_trip():
    assert BatchNormConfig.from_keras({**KERAS_DEFAULT, "axis": -1, "virtual_batch_size": 2}).axis == -1
    assert BatchNormConfig.from_keras({**KERAS_DEFAULT, "axis": [1], "virtual_batch_size": 2}).axis == (1,)
    ours = BatchNormConfig(axis=(2, 3), virtual_batch_size=2)
    assert BatchNormConfig.from_keras(json.loads(ours.to_json())) == ours
    assert BatchNormConfig.from_keras({**KERAS_DEFAULT, "axis": [3]}).axis == (3,)     # no ghost: no shift


def test_from_keras_built_flag_forces_the_reading():
    d = {**KERAS_DEFAULT, "axis": [3], "virtual_batch_size": 2}
    assert BatchNormConfig.from_keras(d, built=False).axis == (3,)
    assert BatchNormConfig.from_keras(d, built=True).axis == (2,)
    with pytest.raises(ConfigError, match="built"):
        BatchNormConfig.from_keras({**KERAS_DEFAULT, "axis": [1], "virtual_batch_size": 2}, built=True)


def test_cli_build_accepts_the_built_ghost_axis(tmp_path):
    import onnx

    from bncompile.cli import main

    layer = tmp_path / "layer.json"
    layer.write_text(json.dumps({**KERAS_DEFAULT, "axis": [4], "virtual_batch_size": 2}))
    out = tmp_path / "bn.onnx"
    assert main(["build", "--keras-config", str(layer), "--input-shape", "N,4,4,3", "--training",
                 "-o", str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["bncompile.config"])["axis"] == [3]
