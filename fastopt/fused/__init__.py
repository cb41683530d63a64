"""The fused engine: run any chain of callbacks as one compiled pass over the parameters, gradients and state where they live.

Stages, one module each: `ir` (the graph), `trace` (callbacks to a graph), `lower` (torch ops to primitives, passes),
`cpu` and `cuda` (kernels), `engine` (`FusedEngine`, `AutoEngine`)."""
# Hand-written (nbdev does not generate this file): the public names of the stages.
from .ir import *
from .trace import *
from .lower import *
