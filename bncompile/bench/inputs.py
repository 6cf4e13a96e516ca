"""The benchmark's inputs: the model's graph inputs, the batch sizes, the concrete shape of every
input per batch, and the seeded feeds (:func:`bncompile.onnx_utils.model_feeds`, the same for every
variant)."""

from __future__ import annotations

from typing import Sequence

import onnx

from bncompile.errors import InputError


def graph_inputs(model: onnx.ModelProto) -> list[tuple[str, list]]:
    """(name, dims) of the real inputs; a dim is an int, or a str / None when free."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise InputError(f"input {vi.name!r} is not a tensor: bncompile bench feeds tensors only")
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise InputError(f"input {vi.name!r} has no shape: give it with --input-shape {vi.name}=...")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out.append((vi.name, dims))
    return out


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,8"`` -> ``(1, 8)``; InputError naming the value otherwise."""
    try:
        values = tuple(int(t) for t in str(text).split(","))
        if not values or any(v < 1 or v > 2**31 - 1 for v in values):
            raise ValueError
    except ValueError:
        raise InputError(f"--batch {text!r}: give positive integers (below 2^31) separated by commas, e.g. 1,8") from None
    if len(set(values)) != len(values):
        raise InputError(f"--batch {text!r}: a batch size is repeated; give each once")
    return values


def resolve_shapes(inputs: list[tuple[str, list]], batches: Sequence[int] | None,
                   input_shapes: dict | None = None) -> tuple[list[int], dict[int, dict[str, tuple]]]:
    """The batch sizes and, per batch, the concrete shape of every input.

    The first axis of each input of rank >= 1 is its batch axis: a free one takes the batch size, a
    fixed one must equal it (InputError otherwise). Without ``batches``: (1,) when some batch axis is
    free, else the model's fixed batch. Other free axes must be given in ``input_shapes``.
    """
    input_shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    unknown = set(input_shapes) - {n for n, _ in inputs}
    if unknown:
        raise InputError(f"--input-shape names unknown inputs {sorted(unknown)}: the model's inputs are "
                         f"{[n for n, _ in inputs]}")
    fixed = {n: dims[0] for n, dims in inputs if dims and isinstance(dims[0], int) and dims[0] > 0}
    free_batch = any(dims and not (isinstance(dims[0], int) and dims[0] > 0) for _, dims in inputs)
    if batches is None:
        fixed_values = set(fixed.values())
        batches = (1,) if free_batch or not fixed_values else (min(fixed_values),)
    batches = [int(b) for b in batches]
    if not batches or any(b < 1 for b in batches):
        raise InputError(f"batches {batches}: give positive batch sizes, e.g. --batch 1,8")
    if len(set(batches)) != len(batches):
        raise InputError(f"batches {batches}: a batch size is repeated; give each once")
    for name, b0 in fixed.items():
        bad = [b for b in batches if b != b0]
        if bad:
            raise InputError(f"--batch {bad[0]} contradicts input {name!r}, whose batch dimension is "
                             f"fixed to {b0}: use --batch {b0} (or a model with a free batch dimension)")
    per_batch: dict[int, dict[str, tuple]] = {}
    for b in batches:
        shapes = {}
        for name, dims in inputs:
            given = input_shapes.get(name)
            if given is not None and len(given) != len(dims):
                raise InputError(f"--input-shape {name}: rank {len(given)} but the model's input has "
                                 f"rank {len(dims)} {dims}")
            shape = []
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    if given is not None and axis > 0 and given[axis] != d:
                        raise InputError(f"--input-shape {name}: {list(given)} does not match the "
                                         f"model's fixed shape {dims}")
                    shape.append(d)
                elif axis == 0:
                    shape.append(b)
                elif given is not None:
                    shape.append(given[axis])
                else:
                    raise InputError(f"input {name!r} has a free dimension {d!r} at axis {axis}: "
                                     f"give it with --input-shape {name}=...")
            shapes[name] = tuple(shape)
        per_batch[b] = shapes
    return batches, per_batch
