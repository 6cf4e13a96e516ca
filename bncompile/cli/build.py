"""``bncompile build``: a Keras BatchNormalization layer's arguments -> an ONNX model."""

from __future__ import annotations

import json

import numpy as np

from bncompile._io import Files, check_input_file
from bncompile.errors import ConfigError, InputError

DESCRIPTION = """Build an ONNX model (opset 15) of one Keras BatchNormalization layer, in inference mode
or as a training step (inputs x and the variables; outputs y and the updated variables as <name>_new).
Arguments come from flags, or from a Keras layer.get_config() JSON (--keras-config) that the flags
then override."""


def _axis(text: str):
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"axis: expected an int or a comma-separated list of ints, got {text!r}") from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def _clipping(text: str) -> dict:
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"renorm_clipping: expected key=value pairs such as rmax=3,rmin=0.3,dmax=5, got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"renorm_clipping: {key.strip()} must be a number, got {value!r}") from None
    return out


def add_arguments(p) -> None:
    p.add_argument("--keras-config", metavar="LAYER.json",
                   help="JSON of Keras's layer.get_config() (or a serialized layer {class_name, config})")
    p.add_argument("--input-shape", required=True, type=str,
                   help="input shape, comma-separated; N (or None, ?) for a dynamic batch, e.g. N,32,32,16")
    p.add_argument("--training", action="store_true", help="build a training step (default: inference)")
    p.add_argument("--gradients", action="store_true",
                   help="with --training: also take dy and output dx, dgamma, dbeta (the gradients of sum(y*dy))")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--weights", metavar="W.npz", help="initial variable values by Keras name (gamma, beta, ...)")
    p.add_argument("-o", "--output", default="batchnorm.onnx", help="output path (default: batchnorm.onnx)")
    p.add_argument("--summary-json", action="store_true", help="print a JSON summary instead of text")
    g = p.add_argument_group("Keras layer arguments (override --keras-config)")
    g.add_argument("--axis", type=str)
    g.add_argument("--momentum", type=float)
    g.add_argument("--epsilon", type=float)
    g.add_argument("--no-center", dest="center", action="store_const", const=False)
    g.add_argument("--no-scale", dest="scale", action="store_const", const=False)
    g.add_argument("--renorm", action="store_const", const=True)
    g.add_argument("--renorm-clipping", type=str, metavar="rmax=3,rmin=0.3,dmax=5")
    g.add_argument("--renorm-momentum", type=float)
    g.add_argument("--fused", choices=["none", "true", "false"])
    g.add_argument("--not-trainable", dest="trainable", action="store_const", const=False)
    g.add_argument("--virtual-batch-size", type=int)
    g.add_argument("--adjustment", choices=["inputs", "random"])
    g.add_argument("--name", type=str)


def files(args) -> Files:
    """--keras-config and --weights (read); the model (written)."""
    return (Files().read(args.keras_config, "--keras-config file").read(args.weights, "--weights file")
            .write(args.output, "model"))


def config_from_args(args):
    from bncompile.config import BatchNormConfig

    base: dict = {}
    if args.keras_config:
        path = check_input_file(args.keras_config, "keras config")
        try:
            base = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"keras config {args.keras_config!r} is not valid JSON ({err}); "
                             "save layer.get_config() with json.dump") from None
        if isinstance(base, dict) and "class_name" in base and "config" in base:
            base = base["config"]
        if not isinstance(base, dict):
            raise InputError(f"keras config {args.keras_config!r} must hold a JSON object")
    over = {}
    if args.axis is not None:
        over["axis"] = _axis(args.axis)
    for k in ("momentum", "epsilon", "center", "scale", "renorm", "renorm_momentum", "trainable",
              "virtual_batch_size", "adjustment", "name"):
        v = getattr(args, k)
        if v is not None:
            over[k] = v
    if args.renorm_clipping is not None:
        over["renorm_clipping"] = _clipping(args.renorm_clipping)
    if args.fused is not None:
        over["fused"] = {"none": None, "true": True, "false": False}[args.fused]
    return BatchNormConfig.from_keras({**base, **over})


def run(args) -> int:
    import onnx

    from bncompile import onnx_utils
    from bncompile.builder import build_model

    config = config_from_args(args)
    shape = onnx_utils.parse_shape(args.input_shape)
    weights = None
    if args.weights:
        path = check_input_file(args.weights, "weights")
        try:
            with np.load(path, allow_pickle=False) as z:
                weights = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - any unreadable npz is a bad input
            raise InputError(f"weights file {args.weights!r} is not a readable .npz ({err})") from None
    if args.gradients and not args.training:
        raise ConfigError("--gradients: the gradients belong to a training step; add --training")
    model = build_model(config, shape, training=args.training, dtype=args.dtype, weights=weights,
                        gradients=args.gradients)
    onnx.checker.check_model(model, full_check=True)
    onnx_utils.save_model_proto(model, args.output)
    summary = {
        "output": args.output,
        "mode": "training" if any(o.name.endswith("_new") for o in model.graph.output) else "inference",
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "ops": sorted({n.op_type for n in model.graph.node}),
    }
    if args.summary_json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.output}: {summary['mode']} model, inputs {', '.join(summary['inputs'])}; "
              f"outputs {', '.join(summary['outputs'])}")
    return 0
