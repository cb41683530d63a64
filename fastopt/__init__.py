"""fastai-style optimizers from composable callbacks, run as one fused pass, as real torch optimizers

Modules:

- `fastopt.zoo_lamb`: Three ways to clip LAMB's trust ratio (fastai's, the paper's, timm's), each a single step callback after Adam's averages.
- `fastopt.zoo_lion_adan`: Two recent optimizers as a few callbacks each: Lion steps by the sign of an interpolated momentum, Adan adds a momentum of gradient *differences* (a Nesterov look-ahead without the extra forward pass).
- `fastopt.zoo_muon`: Orthogonalised momentum for the 2-D weights, AdamW for the rest: a matrix operation as a callback, and a callback that routes each parameter to its own chain.
- `fastopt.zoo_schedule_free`: No learning-rate schedule: train at the point `y`, evaluate at the running average `x`. A fastai callback switches the weights for validation and saving."""

__version__ = "0.1.0"
# Hand-written (nbdev does not generate this file): the public API, fastai.optimizer's names first.
from .optimizer import *
from .sgd import *
from .adaptive import *
from .layerwise import *
from .lookahead import *
from .wrapper import *
from .zoo_lion_adan import *
from .zoo_adam_variants import *
from .zoo_schedule_free import *
from .zoo_muon import *
from .zoo_lamb import *
from .zoo import *
