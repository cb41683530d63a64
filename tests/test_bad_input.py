"""Bad input raises ValueError/TypeError whose message names the argument and the value, and changes nothing.

Every case is checked on a trained optimizer (state present) by comparing a deep snapshot of its hypers, defaults,
state, parameters and groups before and after the failed call."""
from copy import deepcopy

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
import fastopt as fo
from state_helpers import deep_equal


def make_params(seed=0):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2)),
            nn.Parameter(torch.randn(5))]


def trained(opt_func=fo.Adam, **kw):
    "An optimizer over two groups with a few steps of state"
    ps = make_params()
    opt = opt_func([ps[:2], ps[2:]], **{'lr': 1e-2, **kw})
    for _ in range(3):
        for p in ps: p.grad = torch.randn_like(p)
        opt.step()
    return opt


def snapshot(opt):
    "Everything an optimizer holds, deep-copied: hypers, defaults, state per parameter (in order), params, grads"
    ps = [p for g in opt.param_groups for p in g['params']]
    return dict(
        hypers=[deepcopy(dict(h)) for h in opt.hypers],
        groups=[[id(p) for p in g['params']] for g in opt.param_groups],
        defaults=deepcopy(dict(getattr(opt, 'defaults', {}))),
        state=[deepcopy(dict(opt.state[p])) if p in opt.state else None for p in ps],
        nstate=len(opt.state),
        params=[p.detach().clone() for p in ps],
        grads=[None if p.grad is None else p.grad.clone() for p in ps],
        requires_grad=[p.requires_grad for p in ps],
        frozen_idx=opt.frozen_idx,
        count=getattr(opt, 'count', None),
    )


def assert_raises_unchanged(opt, fn, exc, *names):
    "Call `fn`, expect `exc` whose message contains every string in `names`, and `opt` exactly as it was"
    before = snapshot(opt)
    with pytest.raises(exc) as ei: fn()
    msg = str(ei.value)
    for n in names: assert n in msg, f"{n!r} not in message {msg!r}"
    after = snapshot(opt)
    for k in before: assert deep_equal(before[k], after[k]), f"{k} changed by a failed call: {msg}"
    return msg


# -- construction: the optimizer functions and Optimizer directly --------------------------------------------------

OPT_FUNCS = [fo.SGD, fo.RMSProp, fo.Adam, fo.RAdam, fo.QHAdam, fo.Larc, fo.Lamb, fo.ranger]

BAD_HYPERS = [  # (kwargs, exception, strings the message must contain)
    (dict(lr=-1), ValueError, ['`lr`', '-1']),
    (dict(lr=-1e-3), ValueError, ['`lr`', '-0.001']),
    (dict(lr='1e-3'), TypeError, ['`lr`', "'1e-3'"]),
    (dict(lr=None), TypeError, ['`lr`', 'None']),
    (dict(lr=float('nan')), ValueError, ['`lr`', 'nan']),
    (dict(lr=1e-3, mom=1.0), ValueError, ['`mom`', '1.0']),
    (dict(lr=1e-3, mom=-0.1), ValueError, ['`mom`', '-0.1']),
    (dict(lr=1e-3, mom=1.5), ValueError, ['`mom`', '1.5']),
    (dict(lr=1e-3, mom='0.9'), TypeError, ['`mom`', "'0.9'"]),
    (dict(lr=1e-3, wd=-0.1), ValueError, ['`wd`', '-0.1']),
    (dict(lr=1e-3, eps=0.), ValueError, ['`eps`', '0.0']),
    (dict(lr=1e-3, eps=-1e-8), ValueError, ['`eps`', '-1e-08']),
]
SQR_MOM_FUNCS = [fo.RMSProp, fo.Adam, fo.RAdam, fo.QHAdam, fo.Lamb]
BAD_SQR_MOM = [(dict(lr=1e-3, sqr_mom=1.0), ValueError, ['`sqr_mom`', '1.0']),
               (dict(lr=1e-3, sqr_mom=-0.5), ValueError, ['`sqr_mom`', '-0.5']),
               (dict(lr=1e-3, sqr_mom='0.99'), TypeError, ['`sqr_mom`', "'0.99'"]),
               (dict(lr=1e-3, sqr_mom=[0.9, 1.]), ValueError, ['`sqr_mom`', '1.0'])]


def _ids(cases): return [f"{k}" for k, *_ in cases]


@pytest.mark.parametrize('func', OPT_FUNCS, ids=lambda f: f.__name__)
@pytest.mark.parametrize('kw,exc,names', BAD_HYPERS, ids=_ids(BAD_HYPERS))
def test_opt_func_bad_hyper(func, kw, exc, names):
    if func is fo.SGD and 'eps' in kw: pytest.skip("SGD has no eps")
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(exc) as ei: func(ps, **kw)
    for n in names: assert n in str(ei.value), str(ei.value)
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and all(p.requires_grad for p in ps)


@pytest.mark.parametrize('func', SQR_MOM_FUNCS, ids=lambda f: f.__name__)
@pytest.mark.parametrize('kw,exc,names', BAD_SQR_MOM, ids=_ids(BAD_SQR_MOM))
def test_opt_func_bad_sqr_mom(func, kw, exc, names):
    ps = make_params()
    with pytest.raises(exc) as ei: func([ps[:2], ps[2:]], **kw)
    for n in names: assert n in str(ei.value), str(ei.value)


@pytest.mark.parametrize('kw,exc,names', BAD_HYPERS + BAD_SQR_MOM, ids=_ids(BAD_HYPERS + BAD_SQR_MOM))
def test_optimizer_bad_hyper(kw, exc, names):
    cbs = [fo.weight_decay, fo.average_grad, fo.average_sqr_grad, fo.step_stat, fo.adam_step]
    ps = make_params()
    with pytest.raises(exc) as ei: fo.Optimizer([ps[:2], ps[2:]], cbs, **kw)
    for n in names: assert n in str(ei.value), str(ei.value)


@pytest.mark.parametrize('kw,exc,names', BAD_HYPERS, ids=_ids(BAD_HYPERS))
def test_group_dict_bad_hyper(kw, exc, names):
    "A bad hyper in a torch-style group dict is caught like a default"
    ps = make_params()
    with pytest.raises(exc) as ei: fo.SGD([{'params': ps[:2]}, {'params': ps[2:], **kw}], lr=1e-3)
    for n in names: assert n in str(ei.value), str(ei.value)


def test_bool_is_not_a_number():
    with pytest.raises(TypeError, match='`mom`.*True'): fo.SGD(make_params(), lr=1e-3, mom=True)
    with pytest.raises(TypeError, match='`lr`.*True'): fo.Adam(make_params(), lr=True)


@pytest.mark.parametrize('params', [[], [[]], [[], []], iter([]), [{'params': []}]], ids=['list', 'group', 'groups', 'iter', 'dict'])
def test_empty_params(params):
    with pytest.raises(ValueError, match='`params`'): fo.Adam(params, lr=1e-3)


def test_empty_params_optimizer():
    with pytest.raises(ValueError, match='`params`'): fo.Optimizer([], [fo.sgd_step], lr=1e-3)
    with pytest.raises(ValueError, match='`params`'): fo.ranger([], lr=1e-3)


@pytest.mark.parametrize('make_groups', [
    lambda ps: [ps[:2], ps[1:]],                                        # lists
    lambda ps: [{'params': ps[:2]}, {'params': [ps[3], ps[0]], 'lr': 1}],  # dicts
    lambda ps: [ps[0], ps[1], ps[0]],                                   # one group
], ids=['lists', 'dicts', 'same-group'])
def test_same_param_twice(make_groups):
    ps = make_params()
    with pytest.raises(ValueError) as ei: fo.Adam(make_groups(ps), lr=1e-3)
    assert '`params`' in str(ei.value) and 'more than once' in str(ei.value)


def test_not_tensors():
    with pytest.raises(TypeError, match='`params`'): fo.SGD([1., 2.], lr=0.1)
    with pytest.raises(TypeError, match='`params`'): fo.SGD(3, lr=0.1)
    with pytest.raises(TypeError, match='`cbs`'): fo.Optimizer(make_params(), [fo.sgd_step, 'sgd'], lr=0.1)


def test_add_param_group_duplicate():
    opt = trained()
    ps = opt.param_groups[0]['params']
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match='`params`.*more than once'): opt.add_param_group({'params': [ps[0]]})
    assert len(opt.param_groups) == n
    with pytest.raises(ValueError, match='`lr`.*-2'): opt.add_param_group({'params': [nn.Parameter(torch.ones(2))], 'lr': -2})
    assert len(opt.param_groups) == n


# -- set_hyper / set_hypers / hypers ------------------------------------------------------------------------------

SET_BAD = [
    ('lr', -1, ValueError, ['`lr`', '-1']),
    ('lr', '0.1', TypeError, ['`lr`', "'0.1'"]),
    ('lr', [0.1, 0.2, 0.3], ValueError, ['`lr`', '3 values', '2 parameter groups', '[0.1, 0.2, 0.3]']),
    ('lr', [0.1, -0.2], ValueError, ['`lr`', '-0.2']),
    ('lr', [0.1, 'a'], TypeError, ['`lr`', "'a'"]),
    ('lr', slice(-1e-3, 1e-2), ValueError, ['`lr`', '-0.001']),
    ('mom', 1.0, ValueError, ['`mom`', '1.0']),
    ('mom', [0.9, 1.2], ValueError, ['`mom`', '1.2']),
    ('sqr_mom', -0.01, ValueError, ['`sqr_mom`', '-0.01']),
    ('sqr_mom', 1, ValueError, ['`sqr_mom`', '1']),
    ('eps', 0, ValueError, ['`eps`', '0']),
    ('eps', -1e-5, ValueError, ['`eps`', '-1e-05']),
    ('wd', [0.1, 0.1, 0.1, 0.1], ValueError, ['`wd`', '4 values']),
]


@pytest.mark.parametrize('opt_func', [fo.Adam, fo.ranger], ids=['Adam', 'ranger'])
@pytest.mark.parametrize('k,v,exc,names', SET_BAD, ids=[f'{k}={v}' for k, v, *_ in SET_BAD])
def test_set_hyper_bad(opt_func, k, v, exc, names):
    opt = trained(opt_func)
    assert_raises_unchanged(opt, lambda: opt.set_hyper(k, v), exc, *names)


@pytest.mark.parametrize('k,v,exc,names', SET_BAD, ids=[f'{k}={v}' for k, v, *_ in SET_BAD])
def test_set_hypers_bad_after_good(k, v, exc, names):
    "set_hypers checks every value before setting any: a good one before the bad one is not applied"
    opt = trained()
    kw = {'wd': 0.5, k: v} if k != 'wd' else {'lr': 0.5, k: v}
    assert_raises_unchanged(opt, lambda: opt.set_hypers(**kw), exc, *names)


def test_hypers_setter_bad():
    opt = trained()
    good = [dict(h) for h in opt.hypers]
    assert_raises_unchanged(opt, lambda: setattr(opt, 'hypers', good[:1]), ValueError, '`hypers`', '1 groups')
    bad = [dict(good[0]), {**good[1], 'lr': -5}]
    assert_raises_unchanged(opt, lambda: setattr(opt, 'hypers', bad), ValueError, '`lr`', '-5')


def test_set_hyper_good_still_works():
    "After all the failures above, good values are applied (the checks are not simply rejecting everything)"
    opt = trained()
    opt.set_hyper('lr', slice(1e-3, 1e-1)); assert [h['lr'] for h in opt.hypers] == pytest.approx([1e-3, 1e-1])
    opt.set_hypers(mom=[0.8, 0.85], wd=0.)
    assert [h['mom'] for h in opt.hypers] == [0.8, 0.85] and [h['wd'] for h in opt.hypers] == [0., 0.]
    opt.set_hyper('my_unchecked_hyper', 'anything')  # no check registered: any value
    assert opt.hypers[1]['my_unchecked_hyper'] == 'anything'


# -- load_state_dict ------------------------------------------------------------------------------------------------

def _other(groups_fn, opt_func=fo.Adam, **kw):
    "A state dict from a trained optimizer over other params (torch format and fastai format)"
    torch.manual_seed(1)
    ps = [nn.Parameter(torch.randn(*s)) for s in [(4, 3), (3,), (2, 2), (5,), (7,)]]
    opt = opt_func(groups_fn(ps), lr=1e-2, **kw)
    for p in ps: p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def _fastai_format(sd):
    "The same state in fastai 2.8's format: a list of per-param state and a list of hypers"
    state = [sd['state'].get(i, {}) for g in sd['param_groups'] for i in g['params']]
    return {'state': state, 'hypers': [{k: v for k, v in g.items() if k != 'params'} for g in sd['param_groups']]}


BAD_SD = {
    'group-count': (lambda ps: [ps[:2], ps[2:3], ps[3:4]], ValueError, ['`state_dict`', '3 parameter groups', '2']),
    'param-count': (lambda ps: [ps[:2], ps[2:5]], ValueError, ['`state_dict`', '3 parameters', '2']),
    'shape': (lambda ps: [ps[:2], [ps[2], ps[4]]], ValueError, ['`state_dict`', '(7,)', '(5,)']),
    'shape-transposed': (lambda ps: [[ps[0], ps[1]], [ps[2], ps[3]]], None, None),  # same shapes: fits
}


@pytest.mark.parametrize('fmt', ['torch', 'fastai'])
@pytest.mark.parametrize('case', ['group-count', 'param-count', 'shape'])
def test_load_state_dict_mismatch(case, fmt):
    groups_fn, exc, names = BAD_SD[case]
    sd = _other(groups_fn)
    if fmt == 'fastai': sd = _fastai_format(sd)
    if fmt == 'fastai' and case == 'param-count': names = ['`state_dict`', 'state for 5 parameters', '4']
    sd_before = deepcopy(sd)
    opt = trained()
    assert_raises_unchanged(opt, lambda: opt.load_state_dict(sd), exc, *names)
    assert deep_equal(sd, sd_before), "the failed load changed the caller's dict"


def test_load_state_dict_fits():
    "The control: a state dict of the right layout loads (so the failures above are about the layout)"
    sd = _other(BAD_SD['shape-transposed'][0])
    opt = trained()
    opt.load_state_dict(sd)
    assert opt.state_dict()['param_groups'] == sd['param_groups']


@pytest.mark.parametrize('fmt', ['torch', 'fastai'])
def test_load_state_dict_bad_hyper(fmt):
    sd = _other(lambda ps: [ps[:2], ps[2:4]])
    sd['param_groups'][1]['lr'] = -0.5
    if fmt == 'fastai': sd = _fastai_format(sd)
    opt = trained()
    assert_raises_unchanged(opt, lambda: opt.load_state_dict(sd), ValueError, '`lr`', '-0.5')


def test_load_state_dict_not_a_dict():
    opt = trained()
    assert_raises_unchanged(opt, lambda: opt.load_state_dict([1, 2]), TypeError, '`state_dict`', 'list')
    assert_raises_unchanged(opt, lambda: opt.load_state_dict({'foo': 1}), ValueError, '`state_dict`', 'foo')


def test_load_state_dict_shape_in_second_group_last_param():
    "The shape check runs over every parameter before anything is loaded (state of earlier params is untouched)"
    sd = _other(lambda ps: [ps[:2], ps[2:4]])
    sd['state'][3]['sqr_avg'] = torch.zeros(6)
    opt = trained()
    assert_raises_unchanged(opt, lambda: opt.load_state_dict(sd), ValueError, '`sqr_avg`', '(6,)', '(5,)')


@pytest.mark.parametrize('case', ['group-count', 'param-count', 'shape'])
def test_lookahead_load_state_dict_mismatch(case):
    groups_fn, exc, names = BAD_SD[case]
    sd = _other(groups_fn, fo.ranger)
    sd_before = deepcopy(sd)
    opt = trained(fo.ranger)
    assert_raises_unchanged(opt, lambda: opt.load_state_dict(sd), exc, *names)
    assert deep_equal(sd, sd_before)


def test_lookahead_load_state_dict_no_count():
    opt = trained(fo.ranger)
    sd = {k: v for k, v in opt.state_dict().items() if k != 'count'}
    assert_raises_unchanged(opt, lambda: opt.load_state_dict(sd), ValueError, '`count`')


@pytest.mark.parametrize('kw,names', [(dict(k=0), ['`k`', '0']), (dict(k=2.5), ['`k`', '2.5']),
                                      (dict(alpha=1.5), ['`alpha`', '1.5']), (dict(alpha='a'), ['`alpha`', "'a'"])])
def test_lookahead_bad_args(kw, names):
    with pytest.raises((ValueError, TypeError)) as ei: fo.Lookahead(fo.SGD(make_params(), lr=0.1), **kw)
    for n in names: assert n in str(ei.value)
    with pytest.raises(TypeError, match='`opt`'): fo.Lookahead(torch.optim.SGD(make_params(), lr=0.1))


@pytest.mark.parametrize('k,v,exc,names', SET_BAD, ids=[f'{k}={v}' for k, v, *_ in SET_BAD])
def test_optim_wrapper_set_hyper_bad(k, v, exc, names):
    "OptimWrapper checks values like Optimizer (fastai's wrote anything, e.g. a negative lr, into the torch groups)"
    ps = make_params()
    w = fo.OptimWrapper([ps[:2], ps[2:]], opt=torch.optim.AdamW, lr=1e-2)
    for p in ps: p.grad = torch.randn_like(p)
    w.step()
    before = deepcopy(w.opt.state_dict())
    assert_raises_unchanged(w, lambda: w.set_hyper(k, v), exc, *names)
    kw = {'wd': 0.5, k: v} if k != 'wd' else {'lr': 0.5, k: v}
    assert_raises_unchanged(w, lambda: w.set_hypers(**kw), exc, *names)
    assert deep_equal(w.opt.state_dict(), before)
