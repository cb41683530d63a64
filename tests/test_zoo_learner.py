"Every zoo optimizer is a torch optimizer and trains a fastai Learner as its `opt_func` (digits MLP, 2 epochs)"
import random, pytest, torch
from torch import nn
from fastopt.zoo import zoo_optimizers, zoo_optimizer

@pytest.fixture(scope='module')
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return list(zip(torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)))

@pytest.mark.parametrize('name', sorted(zoo_optimizers))
def test_trains_in_a_learner(name, digits):
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    opt_func,lr,cbs = zoo_optimizer(name)
    random.seed(0); torch.manual_seed(0)
    dls = DataLoaders(DataLoader(digits[:1400], bs=64, shuffle=True), DataLoader(digits[1400:], bs=256))
    learn = Learner(dls, nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), loss_func=nn.CrossEntropyLoss(),
                    opt_func=opt_func, metrics=accuracy, cbs=cbs)
    loss0 = learn.validate()[0]
    with learn.no_logging(): learn.fit(2, lr=lr)
    assert isinstance(learn.opt, torch.optim.Optimizer)
    loss,acc = learn.validate()
    assert loss < loss0 * 0.6 and acc > 0.75, (loss0, loss, acc)
    sd = learn.opt.state_dict()  # the state round-trips
    learn.opt.load_state_dict(sd)
