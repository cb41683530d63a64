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
from .batch_size import *
from .smooth import *
from .stability import *
from .zoo_lion_adan import *
from .zoo_adam_variants import *
from .zoo_schedule_free import *
from .zoo_muon import *
from .zoo_lamb import *
from .zoo import *
from .precision import *
from .per_example import *
from .bias_correction import *
from .fused import *
