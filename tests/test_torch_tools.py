"torch.optim tools on every fastopt optimizer: schedulers, GradScaler, hooks, state-dict hooks, add_param_group, clipping"
import copy
import pytest, torch
from torch import nn
from fastopt import SGD, Adam, engines
from torchtools_cases import OPTS, make, make_model, train, batch, snapshot, assert_same

torch.set_num_threads(1)
ENGINES = list(engines)

def _loss(model, i):
    x,y = batch(i)
    return nn.functional.mse_loss(model(x), y)

@pytest.mark.parametrize('name', OPTS)
def test_is_torch_optimizer(name):
    assert isinstance(make(name)[1], torch.optim.Optimizer)

# ---- schedulers ----

def _torch_twin(kind, model):
    "torch's optimizer with the same math as fastopt's `kind` (no weight decay)"
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    if kind == 'sgd': return torch.optim.SGD([{'params': g} for g in groups], lr=0.05, momentum=0.9)
    return torch.optim.Adam([{'params': g} for g in groups], lr=1e-2, betas=(0.9, 0.99), eps=1e-5)

def _ours(kind, model):
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    if kind == 'sgd': return SGD(groups, lr=0.05, mom=0.9)
    return Adam(groups, lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.)

@pytest.mark.parametrize('kind', ['sgd', 'adam'])
def test_onecycle_cycles_mom_like_torch(kind):
    "OneCycleLR(cycle_momentum=True) drives fastai's `mom` (via `momentum` for SGD, `betas` for Adam) exactly as it drives torch's"
    m1, m2 = make_model(), make_model()
    ours, theirs = _ours(kind, m1), _torch_twin(kind, m2)
    key = 'momentum' if kind == 'sgd' else 'betas'
    assert (key in ours.defaults) and (kind == 'adam') == ('betas' in ours.defaults)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.1, total_steps=30, cycle_momentum=True)
    s2 = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.1, total_steps=30, cycle_momentum=True)
    moms = []
    for i in range(30):
        for o,m in ((ours, m1), (theirs, m2)): o.zero_grad(); _loss(m, i).backward(); o.step()
        if i < 29: s1.step(); s2.step()  # the 30th step would pass total_steps
        tm = theirs.param_groups[0]['momentum'] if kind == 'sgd' else theirs.param_groups[0]['betas'][0]
        assert ours.param_groups[0]['mom'] == tm and ours.param_groups[1]['mom'] == tm
        assert ours.param_groups[0]['lr'] == theirs.param_groups[0]['lr']
        moms.append(tm)
    assert min(moms) == pytest.approx(0.85) and max(moms) == pytest.approx(0.95)  # it did cycle
    for a,b in zip(m1.parameters(), m2.parameters()): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('name', ['ranger', 'lamb', 'radam', 'larc', 'rmsprop_mom'])
def test_onecycle_cycles_mom_everywhere(name):
    model, opt, sched = make(name, sched=True)
    seen = set()
    for i in range(200):
        opt.zero_grad(); _loss(model, i).backward(); opt.step(); sched.step()
        seen.add(round(opt.param_groups[0]['mom'], 6))
    assert len(seen) > 100 and opt.param_groups[0]['mom'] < 0.95

def _schedulers(opt):
    S = torch.optim.lr_scheduler
    return {'cosine': lambda: S.CosineAnnealingLR(opt, T_max=7, eta_min=1e-4),
            'lambda': lambda: S.LambdaLR(opt, [lambda i: 0.9**i, lambda i: 1/(i+1)]),
            'sequential': lambda: S.SequentialLR(opt, [S.LinearLR(opt, 0.1, 1.0, total_iters=3), S.CosineAnnealingLR(opt, T_max=5)], milestones=[3])}

@pytest.mark.parametrize('which', ['cosine', 'lambda', 'sequential'])
@pytest.mark.parametrize('name', OPTS)
def test_lr_schedulers_like_torch(name, which):
    "The lrs a scheduler sets on a fastopt optimizer are those it sets on torch's SGD with the same groups and lr"
    model, opt, _ = make(name)
    m2 = make_model()
    ref = torch.optim.SGD([{'params': list(m2[0].parameters())}, {'params': list(m2[2].parameters())}], lr=opt.param_groups[0]['lr'])
    s1, s2 = _schedulers(opt)[which](), _schedulers(ref)[which]()
    for i in range(10):
        assert [g['lr'] for g in opt.param_groups] == [g['lr'] for g in ref.param_groups]
        opt.zero_grad(); _loss(model, i).backward(); opt.step(); s1.step()
        ref.step(); s2.step()
    assert len({g['lr'] for g in ref.param_groups}) >= 1 and ref.param_groups[0]['lr'] != ref.param_groups[0]['initial_lr']
    assert s1.state_dict().keys() == s2.state_dict().keys()

# ---- GradScaler ----

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('name', OPTS)
def test_grad_scaler(name, engine):
    "unscale_ then step: a finite step equals the unscaled step; an inf gradient skips it, state untouched, scale halved"
    model, opt, _ = make(name, engine=engine)
    ref_model, ref_opt, _ = make(name, engine=engine)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.**8, growth_interval=1000)
    for i in range(3):
        opt.zero_grad(); scaler.scale(_loss(model, i)).backward()
        scaler.unscale_(opt); scaler.step(opt); scaler.update()
        ref_opt.zero_grad(); _loss(ref_model, i).backward(); ref_opt.step()
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))  # power-of-two scale: unscaling is exact
    before = snapshot(model, opt)
    opt.zero_grad(); scaler.scale(_loss(model, 3)).backward()
    model[2].bias.grad[0] = float('inf')
    scaler.unscale_(opt); scaler.step(opt); scaler.update()
    assert_same(snapshot(model, opt), before)
    assert scaler.get_scale() == 2.**7

# ---- hooks ----

@pytest.mark.parametrize('name', OPTS)
def test_step_hooks(name):
    model, opt, _ = make(name)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append(('pre', o is opt, model[0].bias.detach().clone())))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append(('post', o is opt, model[0].bias.detach().clone())))
    train(model, opt, None, 0, 2)
    assert [c[:2] for c in calls] == [('pre', True), ('post', True)]*2
    assert not torch.equal(calls[0][2], calls[1][2])  # pre sees the weights before the step, post after
    h1.remove(); h2.remove()
    train(model, opt, None, 2, 1)
    assert len(calls) == 4

@pytest.mark.parametrize('name', OPTS)
def test_state_dict_hooks(name):
    "The four state-dict hooks run, post hooks can add entries, load pre hooks can rewrite the dict"
    model, opt, _ = make(name)
    train(model, opt, None, 0, 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append('sd_pre'))
    def sd_post(o, sd): calls.append('sd_post'); sd['epoch'] = 7; return sd
    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert sd['epoch'] == 7 and calls == ['sd_pre', 'sd_post']
    m2, o2, _ = make(name, seed=3)
    def load_pre(o, sd):
        calls.append('load_pre')
        sd = copy.deepcopy(sd); sd.pop('epoch')
        for g in sd['param_groups']: g['lr'] = g['lr'] / 2
        return sd
    o2.register_load_state_dict_pre_hook(load_pre)
    o2.register_load_state_dict_post_hook(lambda o: calls.append(('load_post', o is o2)))
    o2.load_state_dict(sd)
    assert calls[2:] == ['load_pre', ('load_post', True)]
    assert [g['lr'] for g in o2.param_groups] == [g['lr']/2 for g in opt.param_groups]
    assert sd['epoch'] == 7  # the caller's dict is not changed

# ---- add_param_group, clip_grad_norm_ ----

@pytest.mark.parametrize('name', OPTS)
def test_add_param_group(name):
    model, opt, _ = make(name)
    extra = nn.Linear(3, 2)
    opt.add_param_group({'params': extra.parameters(), 'lr': 1e-3})
    assert len(opt.param_groups) == 3 and opt.param_groups[2]['lr'] == 1e-3
    for k in opt.defaults:
        if k != 'lr': assert opt.param_groups[2][k] == opt.defaults[k]
    w = extra.weight.detach().clone()
    for i in range(3):
        opt.zero_grad(); (_loss(model, i) + extra(batch(i)[0][:, :3]).pow(2).mean()).backward(); opt.step()
    assert not torch.equal(w, extra.weight)
    if name != 'sgd': assert len(opt.state[extra.weight]) > 0  # plain SGD keeps no state
    with pytest.raises(ValueError, match='more than once'): opt.add_param_group({'params': [extra.weight]})
    with pytest.raises(ValueError, match='`lr`'): opt.add_param_group({'params': [nn.Parameter(torch.ones(2))], 'lr': -1.})
    assert len(opt.param_groups) == 3

@pytest.mark.parametrize('name', OPTS)
def test_clip_grad_norm(name):
    "clip_grad_norm_ before step gives the step of the rescaled gradients"
    model, opt, _ = make(name); ref_model, ref_opt, _ = make(name)
    for i in range(3):
        opt.zero_grad(); _loss(model, i).backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        ref_opt.zero_grad(); _loss(ref_model, i).backward()
        ref_total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ref_model.parameters()]))
        torch.testing.assert_close(total, ref_total)
        assert total > 0.05  # the clipping did something
        for p in ref_model.parameters(): p.grad.mul_(0.05 / (ref_total + 1e-6))
        ref_opt.step()
    for a,b in zip(model.parameters(), ref_model.parameters()): torch.testing.assert_close(a, b)

@pytest.mark.parametrize('name', OPTS)
def test_torch_names_in_groups(name):
    "A torch-style group (or add_param_group) with `betas`/`momentum`/`weight_decay` sets fastai's hypers, which the step uses"
    model, opt, _ = make(name)
    d = opt.defaults
    torch_kw = {}
    if 'sqr_mom' in d and 'mom' in d: torch_kw['betas'] = (0.5, 0.6)
    elif 'mom' in d: torch_kw['momentum'] = 0.5
    if 'wd' in d: torch_kw['weight_decay'] = 0.2
    fastai_kw = {'mom': 0.5, **({'sqr_mom': 0.6} if 'betas' in torch_kw else {}), **({'wd': 0.2} if 'weight_decay' in torch_kw else {})}
    m1, m2 = make_model(), make_model()
    o1 = OPTS[name]([{'params': list(m1[0].parameters()), **torch_kw}])
    o1.add_param_group({'params': list(m1[2].parameters()), **torch_kw})
    o2 = OPTS[name]([{'params': list(m2[0].parameters()), **fastai_kw}, {'params': list(m2[2].parameters()), **fastai_kw}])
    assert [dict(h) for h in o1.hypers] == [dict(h) for h in o2.hypers]
    assert not any(k in dict.keys(g) for g in o1.param_groups for k in ('betas', 'momentum', 'weight_decay'))
    train(m1, o1, None, 0, 3); train(m2, o2, None, 0, 3)
    assert_same(snapshot(m1, o1), snapshot(m2, o2))
