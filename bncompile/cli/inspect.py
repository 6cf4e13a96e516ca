"""``bncompile inspect model.onnx``: list BatchNormalization nodes, their mode, and what fold would do."""

from __future__ import annotations

import json

DESCRIPTION = ("List the BatchNormalization nodes of a model (graph, opset, mode) and whether "
               "`bncompile fold` would fold each one, into what, or why not. Writes nothing.")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="input .onnx model")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def files(args):
    """The model and its external data (read); nothing is written."""
    from bncompile import onnx_utils
    from bncompile._io import Files

    f = Files()
    for k, p in enumerate(onnx_utils.model_files(args.model)):
        f.read(p, "model" if k == 0 else "model's external data file")
    return f


def inspect_model(model_or_path) -> dict:
    """The BN nodes of a model and what ``fold`` would do with each (the model is not changed)."""
    from bncompile.folding import fold

    result = fold(model_or_path, check=False)
    r = result.report
    return {
        "model": r.input,
        "ir_version": r.ir_version,
        "opset": r.opset,
        "nodes": r.nodes_before,
        "batchnorms": [
            {"node": d.node, "graph": d.graph, "opset": d.opset, "mode": d.mode,
             "would_fold": d.action == "folded", "into": d.into, "into_op": d.into_op,
             "absorbed": d.absorbed, "reason": d.reason}
            for d in r.batchnorms],
        "summary": {"batchnorms": len(r.batchnorms), "foldable": len(r.folded),
                    "left": len(r.left)},
    }


def run(args) -> int:
    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = info["summary"]
    print(f"{info['model']}: IR {info['ir_version']}, opset {info['opset']}, {info['nodes']} nodes, "
          f"{s['batchnorms']} BatchNormalization ({s['foldable']} foldable, {s['left']} not)")
    for b in info["batchnorms"]:
        where = "" if b["graph"] == "main" else f" [{b['graph']}]"
        head = f"  {b['node']}{where} (opset {b['opset']}, {b['mode']})"
        if b["would_fold"]:
            extra = f" with {', '.join(b['absorbed'])}" if b["absorbed"] else ""
            print(f"{head}: folds into {b['into']}{extra}")
        else:
            print(f"{head}: not folded: {b['reason']}")
    return 0
