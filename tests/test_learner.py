"""Real fastai `Learner` runs with fastopt optimizers: fit, fit_one_cycle, lr_find, fine_tune, save/load,
GradientAccumulation, callback lists as `opt_func`, schedulers on hypers no callback reads, wd_bn_bias/train_bn.
Tiny models (torch.nn) and tensor data, so the whole file runs in seconds."""
import random
import warnings
from copy import deepcopy
from functools import partial

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.schedule import *  # fit_one_cycle, fine_tune, lr_find, ParamScheduler, SchedLin
from fastai.callback.training import GradientAccumulation
import fastai.optimizer as fa
import fastopt as fo
from fastopt import Optimizer  # the seed snippets below say `Optimizer`


# -- data, model, learner -------------------------------------------------------------------------------------------

def make_dls(n_train=64, n_valid=32, bs=16, seed=0):
    "Two gaussian blobs; same seed, same data and the same shuffling order"
    random.seed(seed); torch.manual_seed(seed)
    def ds(n):
        y = torch.randint(0, 2, (n,))
        x = torch.randn(n, 6) + (y[:, None] * 2. - 1.)
        return torch.utils.data.TensorDataset(x, y)
    return DataLoaders.from_dsets(ds(n_train), ds(n_valid), bs=bs, device='cpu', num_workers=0)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 2))


def body_head(m):
    "A splitter: the body (linear + batchnorm) and the head, two param groups"
    return [[*m[0].parameters(), *m[2].parameters()], list(m[3].parameters())]


def make_learner(opt_func=fo.Adam, tmp_path=None, splitter=body_head, seed=0, **kw):
    learn = Learner(make_dls(seed=seed), make_model(seed), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func,
                    splitter=splitter, path=tmp_path or '.', **kw)
    learn.remove_cb(learn.progress) if hasattr(learn, 'progress') else None
    return learn


class Record(Callback):
    "Record every optimizer group's hypers and the body's requires_grad after each batch"
    order = 60  # after the schedulers
    def __init__(self): self.hypers, self.rg = [], []  # over several fits (fine_tune runs two)
    def after_batch(self):
        if not self.training: return
        self.hypers.append([dict(h) for h in self.opt.hypers])
        self.rg.append(self.model[0].weight.requires_grad)
    def values(self, k, group=-1): return [h[group][k] for h in self.hypers]


def params_copy(m): return [p.detach().clone() for p in m.parameters()]
def changed(a, b): return [not torch.equal(x, y) for x, y in zip(a, b)]


def deep_equal(a, b):
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and set(a) == set(b) and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return a == b


# -- fit, fit_one_cycle, lr_find --------------------------------------------------------------------------------------

@pytest.mark.parametrize('opt_func', [fo.Adam, fo.SGD, partial(fo.SGD, mom=0.9), fo.RMSProp, fo.RAdam, fo.QHAdam,
                                      fo.Larc, fo.Lamb, fo.ranger],
                         ids=['Adam', 'SGD', 'SGD-mom', 'RMSProp', 'RAdam', 'QHAdam', 'Larc', 'Lamb', 'ranger'])
def test_fit(opt_func):
    learn = make_learner(opt_func)
    before = params_copy(learn.model)
    with learn.no_logging(): learn.fit(2, 1e-2)
    assert isinstance(learn.opt, fo.Optimizer)
    moved = changed(before, params_copy(learn.model))
    if opt_func is fo.Larc: del moved[3]  # LARC's trust ratio is 0 for a zero tensor (the batchnorm bias)
    assert all(moved)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert len(learn.opt.param_groups) == 2


def test_fit_learns():
    learn = make_learner(fo.Adam)
    with learn.no_logging(): learn.fit(5, 1e-2)
    losses = learn.recorder.losses
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 * 0.8


@pytest.mark.parametrize('opt_func', [fo.Adam, partial(fo.SGD, mom=0.9), fo.ranger], ids=['Adam', 'SGD-mom', 'ranger'])
def test_fit_one_cycle_schedules_mom(opt_func):
    learn = make_learner(opt_func)
    rec = Record()
    with learn.no_logging(): learn.fit_one_cycle(2, 1e-2, moms=(0.95, 0.85, 0.95), cbs=rec)
    moms, lrs = rec.values('mom'), rec.values('lr')
    assert len(moms) == 8
    assert max(moms) - min(moms) > 0.05 and min(moms) >= 0.85 - 1e-9 and max(moms) <= 0.95 + 1e-9
    assert max(lrs) - min(lrs) > 5e-3
    # the optimizer's mom is the one the callbacks read: it lives in the param groups
    assert learn.opt.param_groups[0]['mom'] == learn.opt.hypers[0]['mom'] == moms[-1]


def test_lr_find(tmp_path):
    learn = make_learner(fo.Adam, tmp_path)
    before = params_copy(learn.model)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        res = learn.lr_find(num_it=20, show_plot=False)
    assert not [w for w in ws if 'optimizer state' in str(w.message)], [str(w.message) for w in ws]
    assert 1e-7 <= res.valley <= 10
    assert len(learn.recorder.lrs) > 6 and learn.recorder.lrs[-1] > learn.recorder.lrs[0]
    assert not any(changed(before, params_copy(learn.model))), "lr_find restores the model"


# -- freezing: fine_tune, freeze/unfreeze with slice lrs, train_bn -----------------------------------------------------

def test_fine_tune():
    learn = make_learner(fo.Adam)
    rec = Record()
    with learn.no_logging(): learn.fine_tune(1, base_lr=1e-2, freeze_epochs=1, cbs=rec)
    n = len(rec.hypers) // 2
    assert rec.rg[:n] == [False] * n and rec.rg[n:] == [True] * n, "frozen body, then trained"
    body_lr, head_lr = rec.values('lr', 0)[n:], rec.values('lr', 1)[n:]
    # unfrozen with slice(base_lr/100, base_lr): the body's lr is 100 times smaller than the head's
    assert all(b == pytest.approx(h / 100) for b, h in zip(body_lr, head_lr))
    assert max(head_lr) > 0


def test_freeze_unfreeze_slice_lrs():
    learn = make_learner(fo.Adam, train_bn=True)
    learn.freeze()
    assert learn.opt.frozen_idx == 1
    before = params_copy(learn.model)
    with learn.no_logging(): learn.fit(1, 1e-2)
    lin0_w, lin0_b, bn_w, bn_b, head_w, head_b = changed(before, params_copy(learn.model))
    assert not lin0_w and not lin0_b, "the frozen body's linear layer did not move"
    assert bn_w and bn_b, "train_bn: batchnorm params are trained though frozen (force_train)"
    assert head_w and head_b
    learn.unfreeze()
    rec = Record()
    with learn.no_logging(): learn.fit_one_cycle(1, slice(1e-4, 1e-2), cbs=rec)
    lrs = rec.hypers[len(rec.hypers) // 2]
    assert lrs[0]['lr'] == pytest.approx(lrs[1]['lr'] / 100)
    assert all(changed(before, params_copy(learn.model)))


def test_train_bn_false():
    learn = make_learner(fo.Adam, train_bn=False)
    learn.freeze()
    before = params_copy(learn.model)
    with learn.no_logging(): learn.fit(1, 1e-2)
    assert changed(before, params_copy(learn.model)) == [False, False, False, False, True, True]


def test_learner_state_flags():
    "create_opt marks batchnorm/bias params: `do_wd` False unless wd_bn_bias, `force_train` if train_bn"
    learn = make_learner(fo.Adam)  # wd_bn_bias=False, train_bn=True: fastai's defaults
    learn.create_opt()
    m, st = learn.model, learn.opt.state
    for p in (m[0].bias, m[2].weight, m[2].bias, m[3].bias): assert st[p]['do_wd'] is False
    for p in (m[0].weight, m[3].weight): assert 'do_wd' not in st[p]
    for p in (m[2].weight, m[2].bias): assert st[p]['force_train'] is True
    learn = make_learner(fo.Adam, wd_bn_bias=True, train_bn=False)
    learn.create_opt()
    assert all('do_wd' not in learn.opt.state[p] and 'force_train' not in learn.opt.state[p]
               for p in learn.model.parameters())
    # clear_state keeps the flags
    learn = make_learner(fo.Adam)
    with learn.no_logging(): learn.fit(1, 1e-2)
    assert 'grad_avg' in learn.opt.state[learn.model[0].weight]
    learn.opt.clear_state()
    st = learn.opt.state
    assert st[learn.model[2].weight] == {'do_wd': False, 'force_train': True}
    assert st[learn.model[0].weight] == {}


@pytest.mark.parametrize('wd_bn_bias,train_bn,freeze', [(False, True, True), (True, False, True), (False, True, False)])
@pytest.mark.parametrize('name,kw', [('Adam', dict(wd=0.1)), ('SGD', dict(mom=0.9, wd=0.1)), ('Lamb', dict(wd=0.1))])
def test_same_training_as_fastai(name, kw, wd_bn_bias, train_bn, freeze):
    "The same Learner run with fastai's optimizer and with fastopt's: same weights (do_wd, force_train, schedules)"
    models = []
    for mod in (fa, fo):
        learn = make_learner(partial(getattr(mod, name), **kw), wd_bn_bias=wd_bn_bias, train_bn=train_bn)
        if freeze: learn.freeze()
        with learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
        models.append(learn.model)
    for pa, pb in zip(*(m.parameters() for m in models)):
        assert (pa - pb).abs().max() <= 1e-6


# -- save / load --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('opt_func', [fo.Adam, partial(fo.SGD, mom=0.9), fo.ranger], ids=['Adam', 'SGD-mom', 'ranger'])
def test_save_load_with_opt(opt_func, tmp_path):
    learn = make_learner(opt_func, tmp_path)
    with learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    learn.save('m', with_opt=True)
    sd = deepcopy(learn.opt.state_dict())
    learn2 = make_learner(opt_func, tmp_path, seed=1)
    with warnings.catch_warnings(record=True) as ws:  # fastai only warns when the optimizer state does not load
        warnings.simplefilter('always')
        learn2.load('m', with_opt=True)
    assert not [w for w in ws if 'optimizer state' in str(w.message)], [str(w.message) for w in ws]
    assert not any(changed(params_copy(learn.model), params_copy(learn2.model)))
    sd2 = learn2.opt.state_dict()
    assert deep_equal(sd2['state'], sd['state']) and sd2['param_groups'] == sd['param_groups']
    assert sd2.get('count') == sd.get('count')
    # both continue identically
    for l in (learn, learn2):
        with l.no_logging(): l.dls = make_dls(seed=3); l.fit(1, 1e-3)
    assert not any(changed(params_copy(learn.model), params_copy(learn2.model)))


# -- GradientAccumulation ---------------------------------------------------------------------------------------------

def test_gradient_accumulation():
    learn = make_learner(fo.Adam)
    with learn.no_logging(): learn.fit(2, 1e-2, cbs=GradientAccumulation(n_acc=32))  # bs 16: a step every 2 batches
    steps = learn.opt.state[learn.model[0].weight]['step']
    assert steps == 2 * 4 // 2
    learn = make_learner(fo.Adam)
    with learn.no_logging(): learn.fit(2, 1e-2)
    assert learn.opt.state[learn.model[0].weight]['step'] == 8


# -- callback lists as opt_func: the seed-003 snippets, unchanged -------------------------------------------------------

def sgd_cb(p, lr, **kwargs):
    p.data.add_(p.grad.data, alpha=-lr)

def average_grad(p, mom, grad_avg=None, **kwargs):
    # mom is short for momentum
    if grad_avg is None:
        grad_avg = torch.zeros_like(p.grad.data)
    return {'grad_avg': mom * grad_avg + (1 - mom) * p.grad.data}

def momentum_step(p, lr, grad_avg, **kwargs):
    p.data.add_(grad_avg, alpha=-lr)

def average_square_grad(p, square_mom, square_avg=None, **kwargs):
    if square_avg is None:
        square_avg = torch.zeros_like(p.grad.data)
    return {'square_avg': square_mom * square_avg + (1 - square_mom) * p.grad.data ** 2}

def rms_prop_step(p, lr, square_avg, eps, grad_avg=None, **kwargs):
    denom = square_avg.sqrt().add_(eps)
    p.data.addcdiv_(p.grad, denom, value=-lr)


def test_seed_sgd_cb():
    opt_func = partial(Optimizer, cbs=[sgd_cb])
    learn = make_learner(opt_func)
    before = params_copy(learn.model)
    with learn.no_logging(): learn.fit_one_cycle(1, 1.5e-2, moms=(0, 0, 0))
    assert all(changed(before, params_copy(learn.model)))
    assert learn.opt.hypers[0]['mom'] == 0


def test_seed_momentum():
    opt_func = partial(Optimizer, cbs=[average_grad, momentum_step], mom=0.9)
    learn = make_learner(opt_func)
    rec = Record()
    with learn.no_logging(): learn.fit_one_cycle(1, 3e-2, cbs=rec)
    assert max(rec.values('mom')) > min(rec.values('mom'))  # fit_one_cycle drives the seed's `mom` too
    assert 'grad_avg' in learn.opt.state[learn.model[0].weight]


def test_seed_rmsprop():
    opt_func = partial(Optimizer, cbs=[average_square_grad, rms_prop_step], square_mom=0.99, eps=1e-8)
    learn = make_learner(opt_func)
    before = params_copy(learn.model)
    with learn.no_logging(): learn.fit_one_cycle(1, 3e-3)
    assert all(changed(before, params_copy(learn.model)))
    assert learn.opt.hypers[0]['square_mom'] == 0.99
    assert 'square_avg' in learn.opt.state[learn.model[0].weight]


def test_callback_list_with_library_callbacks():
    opt_func = partial(fo.Optimizer, cbs=[fo.weight_decay, fo.average_grad, fo.momentum_step], mom=0.9, wd=1e-2)
    learn = make_learner(opt_func)
    with learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    assert 'grad_avg' in learn.opt.state[learn.model[0].weight]


# -- optimizers without momentum, hypers nothing reads ---------------------------------------------------------------

def test_fit_one_cycle_no_momentum_sgd():
    learn = make_learner(fo.SGD)  # mom=0: no momentum callback
    with learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    assert learn.opt.cbs == [fo.weight_decay, fo.sgd_step]


def test_fit_one_cycle_wrapped_adagrad():
    "fastai issue #2526: fit_one_cycle with a wrapped Adagrad raised KeyError 'mom'"
    learn = make_learner(partial(fo.OptimWrapper, opt=torch.optim.Adagrad))
    rec = Record()
    before = params_copy(learn.model)
    with learn.no_logging(): learn.fit_one_cycle(1, 1e-2, cbs=rec)
    assert isinstance(learn.opt.opt, torch.optim.Adagrad)
    assert all(changed(before, params_copy(learn.model)))
    lrs = rec.values('lr')
    assert max(lrs) - min(lrs) > 1e-3, "the schedule drives the wrapped optimizer's lr"
    assert learn.opt.opt.param_groups[0]['lr'] == lrs[-1]


@pytest.mark.parametrize('opt_func', [fo.Adam, fo.ranger, partial(fo.OptimWrapper, opt=torch.optim.AdamW)],
                         ids=['Adam', 'ranger', 'wrapped-AdamW'])
def test_schedule_unread_hyper(opt_func):
    "A scheduler on a hyper no callback reads: set every batch, training unaffected"
    learn = make_learner(opt_func)
    rec = Record()
    sched = ParamScheduler({'my_hyper': SchedLin(0., 1.)})
    with learn.no_logging(): learn.fit(1, 1e-2, cbs=[sched, rec])
    vals = rec.values('my_hyper')
    assert len(vals) == 4 and vals == sorted(vals) and vals[0] < vals[-1]
    learn.opt.set_hyper('another', 'x')
    with learn.no_logging(): learn.fit(1, 1e-2)
    assert learn.opt.hypers[0]['another'] == 'x'


@pytest.mark.parametrize('name,kw', [('Adam', dict(wd=0.1)), ('SGD', dict(mom=0.9)), ('ranger', dict())])
def test_load_fastai_learner_checkpoint(name, kw, tmp_path):
    "A checkpoint saved by a fastai Learner with fastai's optimizer loads into a Learner using fastopt's; both go on alike"
    la = make_learner(partial(getattr(fa, name), **kw), tmp_path)
    with la.no_logging(): la.fit_one_cycle(1, 1e-2)
    la.save('fastai_ckpt', with_opt=True)
    lb = make_learner(partial(getattr(fo, name), **kw), tmp_path, seed=1)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        lb.load('fastai_ckpt', with_opt=True)
    assert not [w for w in ws if 'optimizer state' in str(w.message)], [str(w.message) for w in ws]
    assert isinstance(lb.opt, fo.Optimizer)
    st_b = lb.opt.state[lb.model[0].weight]
    st_a = la.opt.state[la.model[0].weight]
    assert all(torch.equal(st_a[k], st_b[k]) if isinstance(st_a[k], torch.Tensor) else st_a[k] == st_b[k] for k in st_a)
    for l in (la, lb):
        l.dls = make_dls(seed=3)
        with l.no_logging(): l.fit_one_cycle(1, 1e-2)
    for pa, pb in zip(la.model.parameters(), lb.model.parameters()): assert (pa - pb).abs().max() <= 1e-6


def test_default_splitter():
    "fastai's default splitter (`trainable_params`, one L of tensors) gives one group"
    from fastai.torch_core import trainable_params
    learn = make_learner(fo.Adam, splitter=trainable_params)
    with learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    assert len(learn.opt.param_groups) == 1 and len(learn.opt.param_groups[0]['params']) == 6
