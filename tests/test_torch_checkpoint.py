"""A checkpoint saved by a torch.optim optimizer loads into the fastopt optimizer that does the same math, and training
continues as torch's does; one whose settings fastopt's callbacks do not redo is refused, naming the setting, with the
optimizer and the checkpoint unchanged."""
import io
from copy import deepcopy

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
import fastopt as fo
from fastopt.torch_compat import from_torch_state_dict, save_checkpoint, load_checkpoint
from state_helpers import deep_equal

SHAPES = [(4, 3), (3,), (2, 2), (5,)]


def make_params(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, dtype=dtype)) for s in SHAPES]


def grads(n, seed=1, dtype=torch.float32):
    "`n` steps of random gradients, one per parameter"
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(n)]


def torch_groups(ps, lrs=(1e-2, 3e-3)):
    return [{'params': ps[:2], 'lr': lrs[0]}, {'params': ps[2:], 'lr': lrs[1]}]


def step(opt, ps, gs):
    for p, g in zip(ps, gs): p.grad = g.clone()
    opt.step()


def roundtrip(sd):
    "Through `torch.save` and `torch.load(weights_only=True)`, as a checkpoint file is"
    b = io.BytesIO(); torch.save(sd, b); b.seek(0)
    return torch.load(b, weights_only=True)


def snapshot(opt):
    "The optimizer's state dict, its groups' hypers and its parameters, deep-copied"
    ps = [p for g in opt.param_groups for p in g['params']]
    return dict(sd=deepcopy(opt.state_dict()), hypers=[deepcopy(dict(h)) for h in opt.hypers],
                params=[p.detach().clone() for p in ps], defaults=deepcopy(dict(opt.defaults)))


# -- resuming: torch's checkpoint, fastopt's steps ------------------------------------------------------------------

RESUME = {  # name: (torch optimizer on groups, fastopt optimizer on groups (hypers other than the checkpoint's))
    'AdamW':       (lambda gs: torch.optim.AdamW(gs, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05),
                    lambda gs: fo.Adam(gs, lr=1e-3)),
    'AdamW-fused': (lambda gs: torch.optim.AdamW(gs, weight_decay=0.1, fused=True),
                    lambda gs: fo.Adam(gs, lr=1e-3, mom=0.5)),
    'Adam':        (lambda gs: torch.optim.Adam(gs, betas=(0.9, 0.99), eps=1e-6),
                    lambda gs: fo.Adam(gs, lr=1e-3, wd=0.3)),
    'Adam-L2':     (lambda gs: torch.optim.Adam(gs, weight_decay=0.02, foreach=False),
                    lambda gs: fo.Adam(gs, lr=1e-3, decouple_wd=False)),
    'SGD':         (lambda gs: torch.optim.SGD(gs, momentum=0.9),
                    lambda gs: fo.SGD(gs, lr=0.1, mom=0.5)),
    'SGD-L2':      (lambda gs: torch.optim.SGD(gs, momentum=0.8, weight_decay=1e-2),
                    lambda gs: fo.SGD(gs, lr=0.1, mom=0.9, decouple_wd=False)),
    'SGD-plain':   (lambda gs: torch.optim.SGD(gs),
                    lambda gs: fo.SGD(gs, lr=0.1)),
    'RMSprop':     (lambda gs: torch.optim.RMSprop(gs, alpha=0.9, eps=1e-6),
                    lambda gs: fo.RMSProp(gs, lr=0.1)),
    'RMSprop-centered': (lambda gs: torch.optim.RMSprop(gs, centered=True, weight_decay=1e-2),
                         lambda gs: fo.CentredRMSProp(gs, lr=0.1, decouple_wd=False)),
    'Adam-amsgrad': (lambda gs: torch.optim.Adam(gs, amsgrad=True),
                     lambda gs: fo.zoo.AMSGrad(gs, lr=0.1)),
    'NAdam':       (lambda gs: torch.optim.NAdam(gs, momentum_decay=5e-3),
                    lambda gs: fo.zoo.NAdam(gs, lr=0.1)),
    'Adamax':      (lambda gs: torch.optim.Adamax(gs, weight_decay=1e-2),
                    lambda gs: fo.zoo.Adamax(gs, lr=0.1)),
}


def resume(name, engine, through_file, dtype=torch.float32, n_before=5, n_after=100, cases=RESUME):
    "torch trains `n_before` steps and saves; its copy and a fastopt optimizer loaded from the save train `n_after` more"
    torch_fn, ours_fn = cases[name]
    ps = make_params(dtype=dtype)
    topt = torch_fn(torch_groups(ps))
    gs = grads(n_before + n_after, dtype=dtype)
    for g in gs[:n_before]: step(topt, ps, g)
    sd = topt.state_dict()
    if through_file: sd = roundtrip(sd)
    sd_before = deepcopy(sd)
    ours_ps = make_params(seed=5, dtype=dtype)
    with torch.no_grad():
        for a, b in zip(ours_ps, ps): a.copy_(b)
    ours = ours_fn([ours_ps[:2], ours_ps[2:]])
    ours.engine = engine
    ours.load_state_dict(sd)
    assert deep_equal(sd, sd_before), "loading changed the checkpoint"
    for g in gs[n_before:]:
        step(topt, ps, g)
        step(ours, ours_ps, g)
    return ps, ours_ps, topt, ours


def assert_like_torch(name, engine, ps, ours_ps):
    for i, (a, b) in enumerate(zip(ps, ours_ps)):
        scale = max(1., a.abs().max().item())
        err = (a - b).abs().max().item()
        assert err <= 1e-6 * scale, f"{name} ({engine}): parameter {i} differs from torch's by {err:.3g}"


@pytest.mark.parametrize('engine', ['eager', 'fused'])
@pytest.mark.parametrize('name', list(RESUME))
def test_resume_matches_torch(name, engine):
    ps, ours_ps, topt, ours = resume(name, engine, through_file=name.endswith('fused') or name == 'AdamW')
    assert_like_torch(name, engine, ps, ours_ps)


# -- porting a script: `torch.optim.X` becomes `fastopt.optim.X`, built with its defaults, and the checkpoint loads ------

T = torch.optim
SAME_NAME = {  # name: (torch optimizer on groups, the fastopt.optim optimizer of the same name on groups)
    'Adam':             (lambda gs: T.Adam(gs, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.02), fo.optim.Adam),
    'Adam-amsgrad-max': (lambda gs: T.Adam(gs, amsgrad=True, maximize=True), fo.optim.Adam),
    'Adam-decoupled':   (lambda gs: T.Adam(gs, weight_decay=0.1, decoupled_weight_decay=True),
                         lambda gs: fo.optim.Adam(gs, decoupled_weight_decay=True)),
    'AdamW':            (lambda gs: T.AdamW(gs, weight_decay=0.1), fo.optim.AdamW),
    'AdamW-amsgrad':    (lambda gs: T.AdamW(gs, amsgrad=True, maximize=True, fused=True), fo.optim.AdamW),
    'SGD':              (lambda gs: T.SGD(gs), fo.optim.SGD),
    'SGD-momentum':     (lambda gs: T.SGD(gs, momentum=0.9, weight_decay=1e-2), fo.optim.SGD),
    'SGD-dampening':    (lambda gs: T.SGD(gs, momentum=0.8, dampening=0.3, maximize=True), fo.optim.SGD),
    'SGD-nesterov':     (lambda gs: T.SGD(gs, momentum=0.9, nesterov=True, weight_decay=1e-3), fo.optim.SGD),
    'RMSprop':          (lambda gs: T.RMSprop(gs, alpha=0.9, eps=1e-6), fo.optim.RMSprop),
    'RMSprop-momentum': (lambda gs: T.RMSprop(gs, momentum=0.9, weight_decay=1e-2), fo.optim.RMSprop),
    'RMSprop-centered': (lambda gs: T.RMSprop(gs, momentum=0.5, centered=True, maximize=True), fo.optim.RMSprop),
    'RAdam':            (lambda gs: T.RAdam(gs, weight_decay=1e-2), fo.optim.RAdam),
    'RAdam-decoupled':  (lambda gs: T.RAdam(gs, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
                         lambda gs: fo.optim.RAdam(gs, decoupled_weight_decay=True)),
    'NAdam':            (lambda gs: T.NAdam(gs, momentum_decay=5e-3, weight_decay=1e-2), fo.optim.NAdam),
    'NAdam-decoupled':  (lambda gs: T.NAdam(gs, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
                         lambda gs: fo.optim.NAdam(gs, decoupled_weight_decay=True)),
    'Adamax':           (lambda gs: T.Adamax(gs, weight_decay=1e-2, maximize=True), fo.optim.Adamax),
}


@pytest.mark.parametrize('engine', ['eager', 'fused'])
@pytest.mark.parametrize('name', list(SAME_NAME))
def test_same_name_resumes_as_torch(name, engine):
    ps, ours_ps, _, _ = resume(name, engine, through_file=name in ('Adam', 'SGD-nesterov'), cases=SAME_NAME)
    assert_like_torch(name, engine, ps, ours_ps)


def test_same_name_flags_and_state():
    "torch's flags become the group's hypers, under torch's names; its state takes the names the chain keeps"
    ps = make_params()
    topt = T.RMSprop(torch_groups(ps), momentum=0.9, centered=True, maximize=True)
    for g in grads(3): step(topt, ps, g)
    opt = fo.optim.RMSprop([make_params()[:2], make_params()[2:]])
    opt.load_state_dict(topt.state_dict())
    g0 = opt.param_groups[0]
    assert (g0['centered'], g0['maximize'], g0['mom'], g0['lr']) == (True, True, 0.9, 1e-2)
    st, tst = opt.state[opt.param_groups[0]['params'][0]], topt.state[ps[0]]
    assert set(st) == {'sqr_avg', 'grad_avg', 'step_avg', 'step'} and type(st['step']) is int and st['step'] == 3
    for a, b in (('sqr_avg', 'square_avg'), ('grad_avg', 'grad_avg'), ('step_avg', 'momentum_buffer')): assert torch.equal(st[a], tst[b])
    topt = T.SGD(torch_groups(ps), momentum=0.9, dampening=0.2)
    for g in grads(2): step(topt, ps, g)
    opt = fo.optim.SGD([make_params()[:2], make_params()[2:]], momentum=0.5, nesterov=True, maximize=True)
    opt.load_state_dict(topt.state_dict())
    g0 = opt.param_groups[0]
    assert (g0['mom'], g0['dampening'], g0['nesterov'], g0['maximize']) == (0.9, 0.2, False, False)
    assert torch.equal(opt.state[g0['params'][0]]['grad_avg'], topt.state[ps[0]]['momentum_buffer'])


def test_same_name_older_torch_flags():
    "A flag an older torch did not save steps as torch's default then"
    ps = make_params()
    topt = T.Adam(torch_groups(ps))
    for g in grads(2): step(topt, ps, g)
    sd = topt.state_dict()
    for g in sd['param_groups']: g.pop('maximize')
    opt = fo.optim.Adam([make_params()[:2], make_params()[2:]], maximize=True)
    opt.load_state_dict(sd)
    assert [g['maximize'] for g in opt.param_groups] == [False, False]


@pytest.mark.parametrize('name', ['AdamW', 'SGD', 'RMSprop'])
def test_resume_through_file(name):
    "The same through `torch.save`/`torch.load(weights_only=True)`"
    ps, ours_ps, _, _ = resume(name, 'eager', through_file=True, n_after=10)
    for a, b in zip(ps, ours_ps): torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_loaded_names():
    "Hypers and state in fastopt's names: torch's betas, weight_decay, step and averages; the optimizer's other keys kept"
    ps = make_params()
    topt = torch.optim.AdamW(torch_groups(ps), betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
    for g in grads(3): step(topt, ps, g)
    ours_ps = make_params()
    opt = fo.Adam([ours_ps[:2], ours_ps[2:]], lr=1e-3)
    opt.param_groups[1]['beta'] = 0.5   # a hyper torch has no name for
    opt.state[ours_ps[0]]['do_wd'] = False
    opt.load_state_dict(topt.state_dict())
    g0, g1 = opt.param_groups
    assert (g0['lr'], g0['mom'], g0['sqr_mom'], g0['eps'], g0['wd']) == (1e-2, 0.8, 0.95, 1e-7, 0.05)
    assert g1['lr'] == 3e-3 and g1['beta'] == 0.5
    for k in ('foreach', 'fused', 'capturable', 'differentiable', 'amsgrad', 'maximize', 'decoupled_weight_decay'):
        assert k not in dict.keys(g0), k
    st = opt.state[ours_ps[0]]
    assert set(st) == {'grad_avg', 'sqr_avg', 'step', 'do_wd'} and st['do_wd'] is False
    assert type(st['step']) is int and st['step'] == 3
    tst = topt.state[ps[0]]
    assert torch.equal(st['grad_avg'], tst['exp_avg']) and torch.equal(st['sqr_avg'], tst['exp_avg_sq'])
    assert st['grad_avg'] is not tst['exp_avg'], "the optimizer shares a tensor with the checkpoint"
    # a fastopt checkpoint of it loads back as usual
    opt2 = fo.Adam([make_params()[:2], make_params()[2:]], lr=1e-3)
    opt2.load_state_dict(opt.state_dict())


def test_from_torch_state_dict_changes_nothing():
    ps = make_params()
    topt = torch.optim.SGD(torch_groups(ps), momentum=0.9)
    for g in grads(2): step(topt, ps, g)
    sd = topt.state_dict(); sd_before = deepcopy(sd)
    opt = fo.SGD([ps[:2], ps[2:]], lr=0.5, mom=0.3)
    before = snapshot(opt)
    new = from_torch_state_dict(opt, sd)
    assert deep_equal(sd, sd_before) and all(deep_equal(v, snapshot(opt)[k]) for k, v in before.items())
    assert [g['mom'] for g in new['param_groups']] == [0.9, 0.9] and set(new['state'][0]) == {'grad_avg'}


def test_scheduler_initial_lr_kept():
    "A key torch's schedulers add to the groups (`initial_lr`) comes along, so a scheduler resumes on the loaded optimizer"
    ps = make_params()
    topt = torch.optim.AdamW(torch_groups(ps))
    sched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
    for g in grads(3): step(topt, ps, g); sched.step()
    opt = fo.Adam([make_params()[:2], make_params()[2:]], lr=1e-3)
    opt.load_state_dict(topt.state_dict())
    assert [g['initial_lr'] for g in opt.param_groups] == [1e-2, 3e-3]
    s2 = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5, last_epoch=2)
    s2.load_state_dict(sched.state_dict())
    s2.step(); sched.step()
    assert [g['lr'] for g in opt.param_groups] == [g['lr'] for g in topt.param_groups]


def test_load_checkpoint_file(tmp_path):
    "`save_checkpoint` of a torch optimizer and its model, `load_checkpoint` into a fastopt optimizer"
    model = nn.Linear(3, 2)
    topt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 3)
    for _ in range(3): topt.zero_grad(); model(x).pow(2).mean().backward(); topt.step()
    save_checkpoint(tmp_path/'ck.pth', topt, model)
    model2 = nn.Linear(3, 2)
    opt = fo.Adam(model2.parameters(), lr=1e-3)
    load_checkpoint(tmp_path/'ck.pth', opt, model2)
    for _ in range(5):
        topt.zero_grad(); model(x).pow(2).mean().backward(); topt.step()
        opt.zero_grad(); model2(x).pow(2).mean().backward(); opt.step()
    for a, b in zip(model.parameters(), model2.parameters()): torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# -- refusals: the setting named, nothing changed --------------------------------------------------------------------

def _old_adam(gs):
    "An Adam saved by a torch that did not record `decoupled_weight_decay` (it cannot tell Adam from AdamW)"
    o = torch.optim.AdamW(gs, weight_decay=0.1)
    sd = o.state_dict
    def state_dict():
        d = sd()
        for g in d['param_groups']: g.pop('decoupled_weight_decay')
        return d
    o.state_dict = state_dict
    return o


REFUSE = {  # name: (torch optimizer on groups, fastopt optimizer on groups, strings the message must hold)
    'Adam-L2-into-decoupled': (lambda gs: torch.optim.Adam(gs, weight_decay=0.1), lambda gs: fo.Adam(gs, lr=1e-3),
                               ['torch.optim.Adam', '`weight_decay=0.1`', 'L2', '`decouple_wd=False`']),
    'AdamW-into-L2': (lambda gs: torch.optim.AdamW(gs, weight_decay=0.1), lambda gs: fo.Adam(gs, lr=1e-3, decouple_wd=False),
                      ['`weight_decay=0.1`', 'decoupled', '`decouple_wd=True`']),
    'amsgrad': (lambda gs: torch.optim.Adam(gs, amsgrad=True), lambda gs: fo.Adam(gs, lr=1e-3), ['`amsgrad=True`', 'adam_step']),
    'not-amsgrad': (lambda gs: torch.optim.Adam(gs), lambda gs: fo.zoo.AMSGrad(gs), ['`amsgrad=False`', 'adam_eps_step']),
    'maximize': (lambda gs: torch.optim.AdamW(gs, maximize=True), lambda gs: fo.Adam(gs, lr=1e-3), ['`maximize=True`']),
    'nesterov': (lambda gs: torch.optim.SGD(gs, momentum=0.9, nesterov=True), lambda gs: fo.SGD(gs, lr=0.1, mom=0.9),
                 ['torch.optim.SGD', '`nesterov=True`']),
    'dampening': (lambda gs: torch.optim.SGD(gs, momentum=0.9, dampening=0.1), lambda gs: fo.SGD(gs, lr=0.1, mom=0.9),
                  ['`dampening=0.1`']),
    'SGD-momentum-into-plain': (lambda gs: torch.optim.SGD(gs, momentum=0.9), lambda gs: fo.SGD(gs, lr=0.1),
                                ['`momentum=0.9`', 'no momentum']),
    'SGD-L2-into-decoupled': (lambda gs: torch.optim.SGD(gs, momentum=0.9, weight_decay=1e-3), lambda gs: fo.SGD(gs, lr=0.1, mom=0.9),
                              ['`weight_decay=0.001`', 'L2', '`decouple_wd=False`']),
    'RMSprop-momentum': (lambda gs: torch.optim.RMSprop(gs, momentum=0.9), lambda gs: fo.RMSProp(gs, lr=0.1, mom=0.9),
                         ['torch.optim.RMSprop', '`momentum=0.9`', 'step differently']),
    'RMSprop-centered': (lambda gs: torch.optim.RMSprop(gs, centered=True), lambda gs: fo.RMSProp(gs, lr=0.1),
                         ['`centered=True`']),
    'Adam-into-SGD': (lambda gs: torch.optim.AdamW(gs), lambda gs: fo.SGD(gs, lr=0.1, mom=0.9),
                      ['torch.optim.Adam', "'momentum_step'"]),
    'SGD-into-Adam': (lambda gs: torch.optim.SGD(gs, momentum=0.9), lambda gs: fo.Adam(gs, lr=0.1),
                      ['torch.optim.SGD', "'adam_step'"]),
    'RAdam': (lambda gs: torch.optim.RAdam(gs), lambda gs: fo.RAdam(gs, lr=0.1), ['torch.optim.RAdam', "'radam_step'"]),
    'Adagrad': (lambda gs: torch.optim.Adagrad(gs), lambda gs: fo.Adam(gs, lr=0.1), ['lr_decay', 'not those of a class']),
    'old-Adam-wd': (_old_adam, lambda gs: fo.Adam(gs, lr=0.1), ['`weight_decay=0.1`', '`decoupled_weight_decay`']),
    'SGD-into-optim-Adam': (lambda gs: T.SGD(gs, momentum=0.9), fo.optim.Adam, ['torch.optim.SGD', "'torch_sgd_step'"]),
    'RMSprop-into-optim-RAdam': (lambda gs: T.RMSprop(gs), fo.optim.RAdam, ['torch.optim.RMSprop', "'torch_rmsprop_step'"]),
    'AdamW-into-optim-Adam': (lambda gs: T.AdamW(gs, weight_decay=0.1), fo.optim.Adam,
                              ['`weight_decay=0.1`', 'decoupled', '`decoupled_weight_decay=True`']),
    'RAdam-L2-into-decoupled': (lambda gs: T.RAdam(gs, weight_decay=0.1), lambda gs: fo.optim.RAdam(gs, decoupled_weight_decay=True),
                                ['torch.optim.RAdam', 'L2', '`decoupled_weight_decay=False`']),
}


def refused(torch_fn, ours_fn, names, exc=ValueError, edit=None, ours_groups=lambda ps: [ps[:2], ps[2:]]):
    "A torch checkpoint after 3 steps, loaded into a trained fastopt optimizer: raises naming `names`, nothing changed"
    ps = make_params()
    topt = torch_fn(torch_groups(ps))
    for g in grads(3): step(topt, ps, g)
    sd = topt.state_dict()
    if edit is not None: edit(sd)
    sd_before = deepcopy(sd)
    ours_ps = make_params(seed=3)
    opt = ours_fn(ours_groups(ours_ps))
    for g in grads(2, seed=4): step(opt, ours_ps, g)
    before = snapshot(opt)
    with pytest.raises(exc) as ei: opt.load_state_dict(sd)
    msg = str(ei.value)
    for n in names: assert n in msg, f"{n!r} not in message {msg!r}"
    after = snapshot(opt)
    for k in before: assert deep_equal(before[k], after[k]), f"{k} changed by a refused load: {msg}"
    assert deep_equal(sd, sd_before), "a refused load changed the checkpoint"
    return msg


@pytest.mark.parametrize('name', list(REFUSE))
def test_refused(name):
    refused(*REFUSE[name])


def test_refused_group_count():
    refused(lambda gs: torch.optim.AdamW(gs), lambda gs: fo.Adam(gs, lr=0.1), ['2 parameter groups', '3'],
            ours_groups=lambda ps: [ps[:1], ps[1:2], ps[2:]])


def test_refused_param_count():
    refused(lambda gs: torch.optim.AdamW(gs), lambda gs: fo.Adam(gs, lr=0.1), ['group 0 has 2 parameters', '1'],
            ours_groups=lambda ps: [ps[:1], ps[1:]])


def test_refused_state_shape():
    def swap(ps): return [[ps[0], ps[1]], [ps[3], ps[2]]]   # same counts, other shapes
    refused(lambda gs: torch.optim.AdamW(gs), lambda gs: fo.Adam(gs, lr=0.1), ['`grad_avg`', '(2, 2)', '(5,)'], ours_groups=swap)


def test_refused_bad_step():
    def edit(sd): sd['state'][2]['step'] = torch.tensor(2.5)
    refused(lambda gs: torch.optim.AdamW(gs), lambda gs: fo.Adam(gs, lr=0.1), ['`step`', 'parameter 2', '2.5'], edit=edit)


def test_refused_unknown_state():
    def edit(sd): sd['state'][1]['exp_inf'] = torch.zeros(3)
    refused(lambda gs: torch.optim.AdamW(gs), lambda gs: fo.Adam(gs, lr=0.1), ['`exp_inf`', 'parameter 1'], edit=edit)


def test_refused_bad_hyper():
    "torch lets SGD's momentum reach 1; fastopt's `mom` must stay below"
    refused(lambda gs: torch.optim.SGD(gs, momentum=0.9), lambda gs: fo.SGD(gs, lr=0.1, mom=0.9), ['`mom`', '1.0'],
            edit=lambda sd: sd['param_groups'][1].update(momentum=1.0))
