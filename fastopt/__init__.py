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
from .combine import *
from .wrapper import *
from .torch_compat import *
from .smooth import *
from .precision import *
from .bias_correction import *
# not `*`: its `main` is the figures' command
from .low_bit_state import code_map, quant_midpoints, quantize_blockwise, dequantize_blockwise, unsigned_keys  # noqa: F401
from .low_bit_state import LowBitState, low_bit, AdamW8bit, AdamW4bit, state_bytes, full_precision_state_dict  # noqa: F401
from .fused import *
from . import optim as optim  # torch's signatures and defaults, as `fastopt.optim.Adam`; its names would shadow fastai's above, so not `*`
from . import zoo as zoo      # the optimizer zoo, as `fastopt.zoo.Lion`

# fastai's callbacks are built on first use (see `_lazy_fastai` in `fastopt.optimizer`), so that `import fastopt` does
# not import fastai, which takes a second or more. `from .x import *` would build them, so these modules' other names
# are imported one by one, and the callbacks come through this module's `__getattr__`.
from functools import partial as _partial
import importlib as _importlib
from . import batch_size, stability, per_example, optim_stats
from .optimizer import _lazy_fastai, _deprecated_names, get_default_engine
_mods = (batch_size, stability, per_example, optim_stats)
_lazy = {n: _partial(getattr, m, n) for m in _mods for n in m.__getattr__.names}
globals().update({n: getattr(m, n) for m in _mods for n in m.__all__ if n not in _lazy})
# `fastopt.step_in_backward` is imported on first use of its names, so that `python -m fastopt.step_in_backward` runs it
# fresh (runpy warns about a module the package imported already); its measuring helpers (`main`, `measure`, ...) stay there
_in_backward_names = ('in_backward', 'InBackward')
_lazy['StepInBackward'] = lambda: getattr(_importlib.import_module('fastopt.step_in_backward'), 'StepInBackward')
__all__ = [n for n in globals() if not n.startswith('_') and n not in ('optim', 'zoo')] + list(_in_backward_names) + list(_lazy)
_lazy_getattr,_lazy_dir = _lazy_fastai(globals(), **_lazy)  # without fastai it takes them out of `__all__`
def __dir__(): return sorted({*_lazy_dir(), *_in_backward_names})

# names that moved: served for one release with a `DeprecationWarning` saying where they are now
_zoo_names = ['lion_step', 'lion_momentum', 'Lion', 'average_grad_diff', 'adan_sqr_avg', 'adan_step', 'prox_weight_decay', 'Adan',
              'nadam_step', 'NAdam', 'AMSGrad', 'average_inf_grad', 'adamax_step', 'Adamax', 'StableAdamW', 'debiased_beta',
              'kahan_adam_step', 'KahanAdamW', 'schedule_free_weights', 'schedule_free_adam_step', 'ScheduleFreeOptimizer',
              'ScheduleFreeAdamW', 'ScheduleFreeCallback', 'zeropower_via_newtonschulz', 'muon_lr', 'muon_step', 'is_matrix',
              'Muon', 'lamb_paper_step', 'LambPaper', 'lamb_timm_step', 'LambTimm', 'zoo_optimizers', 'zoo_optimizer']
_moved = {**{n: f'fastopt.zoo:{n}' for n in _zoo_names}, 'tst_param': 'fastopt.sgd:tst_param',
          'AdamWKahan': 'fastopt.precision:AdamWKahan', 'debiased_average_grad': 'fastopt.bias_correction:average_grad_adam',
          'debiased_average_sqr_grad': 'fastopt.bias_correction:average_sqr_grad_adam',
          'stable_adamw_step': 'fastopt.stability:stable_adam_step', 'amsgrad_step': 'fastopt.stability:adam_eps_step',
          'rescale_batch_size': 'fastopt.batch_size:rescale_for_batch_size', 'default_engine': 'fastopt.optimizer:get_default_engine'}
_moved_getattr = _deprecated_names('fastopt', _lazy_getattr, **_moved)

def __getattr__(name):
    if name == 'default_engine':   # was a module global that `import *` copied, so it read 'eager' while the default was 'auto'
        import warnings
        warnings.warn("`fastopt.default_engine` is deprecated: use `fastopt.get_default_engine()` and `set_default_engine()`",
                      DeprecationWarning, stacklevel=2)
        return get_default_engine()
    if name in _in_backward_names: return getattr(_importlib.import_module('fastopt.step_in_backward'), name)
    return _moved_getattr(name)
__getattr__.names = _lazy_getattr.names
