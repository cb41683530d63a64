"""fastai-style optimizers from composable callbacks, run as one fused pass, as real torch optimizers

Modules:

- `fastopt.batch_size`: Change the batch size from b to b′ and move the learning rate, the momentums and ε with it: the Lernapparat rule, the square-root rule for Adam, the linear rule for SGD, and a fastai callback that applies them.
- `fastopt.smooth`: The debiased moving average of the loss that fastai reports, what its lag does to `lr_find`, and a suggestion function that corrects for it.
- `fastopt.stability`: Why Adam can train fine for a long time and then get worse, and the fixes: a bigger ε, ε inside the square root, AMSGrad's running max, Adam-atan2 (no ε) and StableAdamW's update clipping, as callbacks; a scale-aware cap on the per-weight learning rate (`GuardedAdam`) and a fastai callback that watches the loss (`BlowupGuard`)."""

__version__ = "0.1.0"
# Hand-written (nbdev does not generate this file): the public API, fastai.optimizer's names first.
from .optimizer import *
from .sgd import *
from .adaptive import *
from .layerwise import *
from .lookahead import *
from .wrapper import *
from .torch_compat import *
from .smooth import *
from .zoo_lion_adan import *
from .zoo_adam_variants import *
from .zoo_muon import *
from .zoo_lamb import *
from .zoo import *
from .precision import *
from .bias_correction import *
# not `*`: its `main` is the figures' command
from .low_bit import code_map, quant_midpoints, quantize_blockwise, dequantize_blockwise, unsigned_keys  # noqa: F401
from .low_bit import LowBitState, low_bit, AdamW8bit, AdamW4bit, state_bytes, full_precision_state_dict  # noqa: F401
from .fused import *
from . import optim as optim  # torch's signatures and defaults, as `fastopt.optim.Adam`; its names would shadow fastai's above, so not `*`

# fastai's callbacks are built on first use (see `_lazy_fastai` in `fastopt.optimizer`), so that `import fastopt` does
# not import fastai, which takes a second or more. `from .x import *` would build them, so these modules' other names
# are imported one by one, and the callbacks come through this module's `__getattr__`.
from functools import partial as _partial
from . import batch_size, stability, zoo_schedule_free, per_example, optim_stats
from .optimizer import _lazy_fastai, get_default_engine
_mods = (batch_size, stability, zoo_schedule_free, per_example, optim_stats)
_lazy = {n: _partial(getattr, m, n) for m in _mods for n in m.__getattr__.names}
globals().update({n: getattr(m, n) for m in _mods for n in m.__all__ if n not in _lazy})
__all__ = [n for n in globals() if not n.startswith('_') and n != 'optim'] + list(_lazy)  # `from fastopt import *`, as before
_lazy_getattr,__dir__ = _lazy_fastai(globals(), **_lazy)  # without fastai it takes them out of `__all__`

def __getattr__(name):
    if name == 'default_engine':   # a module global that `import *` copied, so it read 'eager' while the default was 'auto'
        import warnings
        warnings.warn("`fastopt.default_engine` is deprecated: use `fastopt.get_default_engine()` and `set_default_engine()`",
                      DeprecationWarning, stacklevel=2)
        return get_default_engine()
    return _lazy_getattr(name)
__getattr__.names = _lazy_getattr.names
