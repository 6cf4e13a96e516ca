"""``bncompile.kernels``: the public name of the batch-normalization kernels, which live in
:mod:`bncompile.lower.kernels` (``compile_batchnorm(config, input_shape) -> Kernel``; see there).
"""

from bncompile.lower.kernels import *  # noqa: F401,F403
from bncompile.lower.kernels import __all__  # noqa: F401
