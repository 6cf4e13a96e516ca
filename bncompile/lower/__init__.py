"""Everything that lowers to TVM (the only package that touches TVM), in the order a compile uses it:

* ``tvm``: the shim, the only module importing TVM (lazily), with the version pin and every patch of TVM;
* ``targets``: the one target parser (names -> TVM target dicts), ``DEFAULT_CUDA_ARCH``;
* ``prepare``: compile's graph preparation on the ONNX protobuf (input shapes, fold, inlining, defaults);
* ``frontend``: ONNX -> Relax, with bncompile's converters for training BN and the custom ops;
* ``kernels``: the batch-normalization kernels (``compute``: TE computes; ``schedules``: rules per target;
  ``conv2d_packed``: the packed-weight conv compute of whole-graph CPU compiles);
* ``graph_schedules``: the Relax pipeline and schedule rules of whole-graph CPU compiles;
* ``driver``: ``compile()``; ``runtime``: ``CompiledModel``, export and ``load``;
* ``runner/``: the C++ runner of exported libraries (package data).

Importing ``bncompile.lower`` does not import TVM.
"""
