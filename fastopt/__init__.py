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
