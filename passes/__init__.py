"""bncompile's graph rewrites, each an onnx-ir pass (one per module, one class per pass), each
returning a :class:`bncompile.passes._result.RewriteResult`; :mod:`bncompile.passes.pipeline` runs
them for ``fold``, ``inline`` and compile's preparation (``prepare_for_lowering``).
Installed as ``bncompile.passes``; never import it as a bare ``passes``."""
