"""Helpers shared by the tests: onnxruntime with every graph optimization off, error measures, the
GPU probe. Imported as ``helpers`` (pytest puts ``tests/`` on ``sys.path``, see ``pythonpath`` in
pyproject.toml); the graph builders of each area are its submodules (``helpers.bn``,
``helpers.fold_graphs``, ``helpers.compile_models``)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnxruntime as ort


def ort_session(model, *, optimize: bool = False):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    data = model if isinstance(model, (str, bytes, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(str(data) if isinstance(data, os.PathLike) else data, so,
                                providers=["CPUExecutionProvider"])


def ort_run(model_or_session, feeds: dict) -> dict:
    """Run and return {output name: array}; bfloat16 arrays (ml_dtypes) travel as OrtValues."""
    s = model_or_session if isinstance(model_or_session, ort.InferenceSession) else ort_session(model_or_session)
    names = [o.name for o in s.get_outputs()]
    if not any(getattr(v, "dtype", None) is not None and v.dtype.name == "bfloat16" for v in feeds.values()):
        return dict(zip(names, s.run(None, feeds)))
    import ml_dtypes
    vals = {k: (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(v).view(np.uint16), 16)
                if v.dtype.name == "bfloat16" else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
            for k, v in feeds.items()}
    outs = s.run_with_ort_values(names, vals)
    result = {}
    for n, o in zip(names, outs):
        if o.data_type() == "tensor(bfloat16)":
            # the bits of a bfloat16 tensor, read through a float32 copy of the same shape
            result[n] = _bf16_to_numpy(o, ml_dtypes)
        else:
            result[n] = o.numpy()
    return result


def _bf16_to_numpy(ortvalue, ml_dtypes):
    import onnx
    from onnx import helper
    shape = ortvalue.shape()
    # cast on the runtime side: a one-node Cast model reads the bfloat16 value
    key = tuple(shape)
    sess = _CAST_SESSIONS.get(key)
    if sess is None:
        g = helper.make_graph([helper.make_node("Cast", ["a"], ["b"], to=onnx.TensorProto.FLOAT)], "cast",
                              [helper.make_tensor_value_info("a", onnx.TensorProto.BFLOAT16, list(shape))],
                              [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, list(shape))])
        sess = _CAST_SESSIONS[key] = ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]))
    f32 = sess.run_with_ort_values(["b"], {"a": ortvalue})[0].numpy()
    return f32.astype(ml_dtypes.bfloat16)


_CAST_SESSIONS: dict = {}


def rel_err(actual, expected) -> float:
    a = np.asarray(actual, dtype=np.float64).reshape(-1)
    e = np.asarray(expected, dtype=np.float64).reshape(-1)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e) / (np.abs(e) + 1e-6))) if a.size else 0.0


def assert_close(actual, expected, rtol: float, what: str = ""):
    a = np.asarray(actual, dtype=np.float64).reshape(-1)
    e = np.asarray(expected, dtype=np.float64).reshape(-1)
    assert a.shape == e.shape, f"{what}: shapes {a.shape} vs {e.shape}"
    # relative to each value, with an absolute floor at the tensor's own scale (values near zero
    # carry the rounding of the larger values they were computed from)
    tol = rtol * (np.abs(e) + np.max(np.abs(e), initial=1.0))
    bad = np.abs(a - e) > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {a.size} values differ; worst |diff| "
                           f"{np.max(np.abs(a - e)):.3g} at {int(np.argmax(np.abs(a - e) - tol))}")


def has_gpu() -> bool:
    """An NVIDIA driver with a GPU: nvidia-smi on PATH and a device node (any index) or the driver's
    GPU list."""
    import glob

    if shutil.which("nvidia-smi") is None:
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))
