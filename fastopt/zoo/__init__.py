"""The optimizer zoo: optimizers from papers and other libraries, each composed from fastopt's callbacks and checked against its reference.

Modules: `lion_adan` (Lion, Adan), `adam_variants` (NAdam, AMSGrad, Adamax, StableAdamW, KahanAdamW), `schedule_free`
(schedule-free AdamW and its fastai callback), `muon` (Muon), `lamb` (the paper's and timm's LAMB), `registry` (pick
one by name)."""
# Hand-written (nbdev does not generate this file): the zoo's names, as `fastopt.zoo.Lion` (the core stays `fastopt.X`).
from .lion_adan import *
from .adam_variants import *
from .muon import *
from .lamb import *
from .registry import *
from . import schedule_free
from ..optimizer import _lazy_fastai

# the schedule-free fastai callback is built on first use, so that importing the zoo does not import fastai
globals().update({n: getattr(schedule_free, n) for n in schedule_free.__all__ if n not in schedule_free.__getattr__.names})
__all__ = [n for n in globals() if not n.startswith('_') and n not in ('lion_adan', 'adam_variants', 'muon', 'lamb', 'registry', 'schedule_free')]
__all__ += list(schedule_free.__getattr__.names)
__getattr__,__dir__ = _lazy_fastai(globals(), **{n: (lambda n=n: getattr(schedule_free, n)) for n in schedule_free.__getattr__.names})
