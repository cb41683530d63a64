"Batch-size rescaling: the rules' algebra, the optimizer-level function, and the fastai callback with a scheduler"
import math
from functools import partial
import pytest, torch
from hypothesis import given, settings, strategies as st
from fastopt import Adam
from fastopt.batch_size import (lernapparat_rule, sqrt_rule, linear_rule, batch_size_rules, rescale_hypers,
                                rescale_for_batch_size, BatchSizeRescale)

H = dict(lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.05)
bss = st.sampled_from([1, 2, 3, 8, 16, 48, 64, 100, 256])

def close(a, b, rel=1e-9):
    assert a.keys() == b.keys()
    for k in a: assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=1e-15), (k, a[k], b[k])

@settings(max_examples=60, deadline=None)
@given(b=bss, b1=bss, b2=bss, rule=st.sampled_from(['lernapparat', 'linear']))
def test_compose(b, b1, b2, rule):
    close(rescale_hypers(rescale_hypers(H, b, b1, rule), b1, b2, rule), rescale_hypers(H, b, b2, rule))

@settings(max_examples=40, deadline=None)
@given(b=bss, k1=st.sampled_from([0.25, 0.5, 1, 2]), k2=st.sampled_from([0.5, 1, 2, 3]))
def test_compose_sqrt(b, k1, k2):
    h = dict(H, mom=0.95, sqr_mom=0.99)  # kappa*(1-beta) < 1 for every product here
    close(rescale_hypers(rescale_hypers(h, b, b*k1, 'sqrt'), b*k1, b*k1*k2, 'sqrt'), rescale_hypers(h, b, b*k1*k2, 'sqrt'))

@pytest.mark.parametrize('rule', list(batch_size_rules))
def test_identity_and_wd(rule):
    close(rescale_hypers(H, 32, 32, rule), H)
    assert rescale_hypers(H, 32, 8, rule)['wd'] == H['wd']

def test_values():
    close(lernapparat_rule(H, 0.5), dict(H, lr=5e-4, mom=0.9**0.5, sqr_mom=0.999**0.5))
    close(sqrt_rule(H, 4), dict(H, lr=2e-3, mom=0.6, sqr_mom=0.996, eps=5e-9))
    close(linear_rule(H, 3), dict(H, lr=3e-3))

def test_ema_weight():
    "b/b' steps with beta**(b'/b) keep an old value's weight exactly as one step with beta"
    for b, b2 in [(64, 1), (64, 16), (100, 25)]:
        beta = lernapparat_rule({'mom': 0.97}, b2/b)['mom']
        assert math.isclose(beta**(b//b2), 0.97, rel_tol=1e-12)

def test_bad_input_mutates_nothing():
    opt = Adam([torch.zeros(2, requires_grad=True)], lr=1e-3)
    opt.add_param_group({'params': [torch.zeros(1, requires_grad=True)], 'mom': 0.5})
    before = [dict(opt.hypers[i]) for i in range(2)]
    with pytest.raises(ValueError, match='mom'): rescale_for_batch_size(opt, 1, 3, 'sqrt')  # group 1: 1-3*0.5 < 0
    with pytest.raises(ValueError, match='new_bs'): rescale_for_batch_size(opt, 1, -3)
    with pytest.raises(ValueError, match='new_bs'): rescale_for_batch_size(opt, 1, True)
    with pytest.raises(TypeError, match='rule'): rescale_for_batch_size(opt, 1, 2, rule=3)
    assert [dict(opt.hypers[i]) for i in range(2)] == before

def test_torch_sgd():
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    rescale_for_batch_size(opt, 128, 512, 'linear')
    assert math.isclose(opt.param_groups[0]['lr'], 0.4) and opt.param_groups[0]['momentum'] == 0.9

def _learner(bs, cbs=None, n=200):
    from fastai.learner import Learner
    import fastai.callback.schedule  # noqa: F401  (patches `fit_one_cycle` and `lr_find` onto `Learner`)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    torch.manual_seed(0)
    x = torch.randn(n, 4); y = x @ torch.randn(4, 1)
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds, bs=bs, shuffle=True), DataLoader(ds[:20], bs=20))
    learn = Learner(dls, torch.nn.Linear(4, 1), loss_func=torch.nn.MSELoss(), opt_func=partial(Adam, wd=0.), cbs=cbs)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == 'ProgressCallback'])
    return learn

def test_callback_one_cycle_and_partial_batch():
    a, b = _learner(40, BatchSizeRescale(10, 'sqrt')), _learner(40)
    for l in (a, b):
        with l.no_logging(): l.fit_one_cycle(2, 1e-2)
    la, lb = torch.tensor(a.recorder.lrs), torch.tensor(b.recorder.lrs)
    torch.testing.assert_close(la, lb*2, rtol=1e-6, atol=0)  # sqrt(40/10)
    ma, mb = torch.tensor(a.recorder.hps['mom']), torch.tensor(b.recorder.hps['mom'])
    torch.testing.assert_close(ma, 1 - 4*(1-mb), rtol=1e-6, atol=1e-7)
    assert a.opt.hypers[0]['eps'] == b.opt.hypers[0]['eps']  # put back after each batch

def test_callback_varying_bs():
    "a partial last batch, and a new dls.train.bs between fits, are both followed; nothing compounds"
    learn = _learner(64, BatchSizeRescale(32))
    with learn.no_logging(): learn.fit(2, 1e-3)
    lrs = learn.recorder.lrs
    assert lrs[:3] == pytest.approx([2e-3]*3) and lrs[3] == pytest.approx(1e-3*8/32)  # 200 = 3*64 + 8
    assert lrs[4:7] == pytest.approx([2e-3]*3)
    learn.dls.train.bs = 32
    with learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.recorder.lrs[0] == pytest.approx(1e-3) and learn.opt.hypers[0]['lr'] == pytest.approx(1e-3)

def test_callback_lr_find_restores():
    import tempfile, pathlib
    learn = _learner(20, BatchSizeRescale(10))
    learn.path = pathlib.Path(tempfile.mkdtemp())
    with learn.no_logging(): learn.lr_find(num_it=30, show_plot=False, suggest_funcs=None)
    learn.opt.set_hyper('lr', 1e-3)
    assert learn.opt.hypers[0]['mom'] == 0.9
