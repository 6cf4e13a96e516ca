"""Issue 14 item 4: ``renorm_clipping`` with rmax < rmin is accepted, as Keras accepts it, and every path
clips r as ``tf.clip_by_value`` does, ``min(max(r, rmin), rmax)``: r is rmax there.

The kernels are checked in tests/lower/test_kernels_exact.py; here the config, the reference, the
custom-op ONNX model (onnxruntime), its inlined form, and compile (where TVM is installed)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.bn import check_steps

from bncompile import BatchNormConfig, build_model, custom_ops
from bncompile.inlining import inline
from bncompile.reference import batchnorm

custom_ops.register_schemas()

CLIPS = [{"rmax": 0.5, "rmin": 2.0}, {"rmax": 0.8, "rmin": 1.2, "dmax": 0.1}, {"rmax": 0.0, "rmin": 1.0}]


@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_config_accepts_rmax_below_rmin(clip):
    cfg = BatchNormConfig(renorm=True, renorm_clipping=clip)
    assert cfg.renorm_clipping == {k: float(v) for k, v in clip.items()}
    assert BatchNormConfig(**cfg.to_dict()).renorm_clipping == cfg.renorm_clipping      # round trip


def test_reference_clips_r_to_rmax_last():
    x = np.random.default_rng(0).normal(2.0, 3.0, (16, 3))
    cfg = BatchNormConfig(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 2.0})
    same = BatchNormConfig(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 0.5})
    a, b = batchnorm(cfg, x, training=True), batchnorm(same, x, training=True)
    np.testing.assert_array_equal(a.y, b.y)


@pytest.mark.parametrize("clip", CLIPS, ids=str)
@pytest.mark.parametrize("shape,axis", [((8, 5), -1), ((8, 3, 5, 4), 1), ((8, 3, 4, 5), [1, 3])])
def test_onnx_model_matches_reference(shape, axis, clip, rng):
    cfg = BatchNormConfig(axis=axis, renorm=True, renorm_clipping=clip, momentum=0.9, renorm_momentum=0.8)
    check_steps(cfg, list(shape), [shape], rng=rng)
    check_steps(cfg, list(shape), [shape], rng=rng, transform=inline)


def test_compile_matches_reference(rng):
    import bncompile

    cfg = BatchNormConfig(axis=-1, renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 2.0, "dmax": 0.3})
    model = build_model(cfg, [6, 4], training=True)
    cm = bncompile.compile(model)
    x = rng.normal(1.0, 2.0, (6, 4)).astype(np.float32)
    out = cm.run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=1e-5)
