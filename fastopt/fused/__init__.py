"""The fused engine: run any chain of callbacks as one compiled pass over the parameters, gradients and state where they live.

Stages, one module each: `ir` (the graph), `trace` (callbacks to a graph), `lower` (torch ops to primitives, and passes),
`cpu` and `cuda` (kernels), `engine` (`FusedEngine`, `AutoEngine`)."""
# Hand-written (nbdev does not generate this file): the names `fastopt` exports from the engine's stages.
from .trace import Untraceable, trace_chain, trace_cached
from .engine import FusedEngine, AutoEngine

__all__ = ['FusedEngine', 'AutoEngine', 'Untraceable', 'trace_chain', 'trace_cached']
