"""The step inside backward (`in_backward`, `StepInBackward`): the same weights and state as normal steps for several
optimizers on both engines, schedulers and `set_hyper`, unused and frozen parameters, `remove`, no double step, the
conflicts refused, and a real fastai `Learner`. Tiny models, so the file runs in seconds."""
import warnings
import weakref
from functools import partial

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
import fastopt as fo
from fastopt import Optimizer, in_backward, InBackward
from fastopt.sgd import weight_decay, average_grad, momentum_step
from fastopt.zoo import Lion
from state_helpers import deep_equal


class Net(nn.Module):
    "An embedding tied to the head (its gradient arrives from two uses), a body, and a layer no loss reaches"
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb,self.body,self.unused = nn.Embedding(vocab, d),nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, d)),nn.Linear(3, 3)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight
    def forward(self, x): return self.head(self.body(self.emb(x)))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 11, (6, 5), generator=g) for _ in range(n)]


def loss_of(m, x): return nn.functional.cross_entropy(m(x).flatten(0, 1), x.roll(1, 1).flatten())


def groups(m):
    "Two groups with different hyper-parameters: the body, and the rest"
    body = list(m.body.parameters())
    return [{'params': body, 'lr': 3e-2}, {'params': [p for p in m.parameters() if all(p is not q for q in body)]}]


def my_chain(ps, lr=1e-2):
    "A user-composed chain: decoupled weight decay, momentum"
    return Optimizer(ps, [weight_decay, partial(average_grad, dampening=True), momentum_step], lr=lr, mom=0.8, wd=0.1)


OPTS = {
    'adam': lambda ps: fo.Adam(ps, lr=1e-2, wd=0.01),
    'sgd_mom': lambda ps: fo.SGD(ps, lr=1e-1, mom=0.9, wd=1e-3),
    'lamb': lambda ps: fo.Lamb(ps, lr=1e-2),
    'lion': lambda ps: Lion(ps, lr=1e-3, wd=0.1),
    'chain': my_chain,
}


def train(make_opt, engine, inb, steps=12, bucket_bytes=128, call_step=True, sched=None, **kw):
    "Train `Net` normally or inside backward; returns the model, the optimizer, the handle"
    m = make_model()
    opt = make_opt(groups(m))
    opt.engine = engine
    h = in_backward(opt, bucket_bytes=bucket_bytes, **kw) if inb else None
    s = sched(opt) if sched is not None else None
    for i,x in enumerate(batches(steps)):
        loss_of(m, x).backward()
        if inb: assert all(p.grad is None for p in m.parameters()), "in-backward frees every gradient"
        if call_step: opt.step()
        opt.zero_grad(set_to_none=True)
        if s is not None: s.step()
    return m, opt, h


def same_run(a, b):
    (m0,o0),(m1,o1) = a[:2],b[:2]
    for (n,p),q in zip(m0.named_parameters(), m1.parameters()): assert torch.equal(p, q), n
    assert deep_equal(o0.state_dict(), o1.state_dict())


@pytest.mark.parametrize('engine', ['eager', 'fused'])
@pytest.mark.parametrize('name', list(OPTS))
def test_same_as_normal_steps(name, engine):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the fused engine's notes (a chain it steps eagerly)
        a = train(OPTS[name], engine, False)
        b = train(OPTS[name], engine, True)
    same_run(a, b)
    h = b[2]
    assert h.stepped['passes'] == 12 and len(h.buckets) > 2
    n_used = sum(1 for n,_ in b[0].named_parameters() if not n.startswith('unused'))
    assert h.stepped['params'] == 12*n_used
    for p in b[0].unused.parameters(): assert not b[1].state[p]   # never stepped: no state, as a normal step
    if engine == 'fused': assert b[1].engine.failed is None and b[1].engine.stepped['fused'] > 0   # the kernels stepped the buckets


def test_checkpoint_round_trip():
    "Save after 4 steps inside backward, load into a fresh model and optimizer, 4 more: as 8 normal steps"
    a = train(OPTS['adam'], 'fused', False, steps=8)
    xs = batches(8)
    m = make_model(); opt = OPTS['adam'](groups(m)); opt.engine = 'fused'
    with in_backward(opt):
        for x in xs[:4]: loss_of(m, x).backward()
    sd_m,sd_o = m.state_dict(),opt.state_dict()
    m2 = make_model(seed=5); opt2 = OPTS['adam'](groups(m2)); opt2.engine = 'fused'
    m2.load_state_dict(sd_m); in_backward(opt2); opt2.load_state_dict(sd_o)   # the hooks read the state loaded after them
    for x in xs[4:]: loss_of(m2, x).backward()
    same_run(a, (m2, opt2))


@pytest.mark.parametrize('bucket_bytes', [0, 4*2**20])
def test_bucket_sizes(bucket_bytes):
    "One parameter per bucket, or the whole model in one bucket (stepped at the end of the pass): the same run"
    same_run(train(OPTS['adam'], 'fused', False), train(OPTS['adam'], 'fused', True, bucket_bytes=bucket_bytes))


def test_buckets_follow_arrival_order():
    m = make_model(); opt = fo.SGD(m.parameters(), lr=0.1)
    h = in_backward(opt, bucket_bytes=0)
    loss_of(m, batches(1)[0]).backward()
    order = [id(b.params[0]) for b in h.buckets]
    assert order[0] == id(m.head.bias)   # the first gradient of backward
    unused = {id(p) for p in m.unused.parameters()}
    assert set(order[-2:]) == unused   # never arrived: last


def test_auto_engine_decides_on_the_whole_optimizer():
    m = make_model(); opt = fo.Adam(m.parameters(), lr=1e-3); opt.engine = 'auto'
    h = in_backward(opt, bucket_bytes=0)
    assert h._engine() is opt.engine.eager   # a tiny optimizer: eager, whatever the bucket
    opt.engine.min_numel = 1
    assert h._engine() is opt.engine.fused


def test_schedulers_and_set_hyper():
    sched = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=12)
    same_run(train(OPTS['adam'], 'fused', False, sched=sched), train(OPTS['adam'], 'fused', True, sched=sched))
    def run(inb):
        m = make_model(); opt = fo.SGD(groups(m), lr=0.1, mom=0.9)
        if inb: in_backward(opt)
        for i,x in enumerate(batches(6)):
            opt.set_hyper('lr', 0.1/(i+1)); opt.set_hypers(mom=0.5 + 0.05*i)
            loss_of(m, x).backward(); opt.step(); opt.zero_grad()
        return m, opt
    same_run(run(False), run(True))


def test_scheduler_without_step_call_does_not_warn():
    "A loop that drops `opt.step()`: torch's scheduler knows the steps were taken"
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        b = train(OPTS['sgd_mom'], 'eager', True, call_step=False, sched=sched)
    same_run(train(OPTS['sgd_mom'], 'eager', False, sched=sched), b)


def test_no_double_step():
    "`opt.step()` after a backward pass inside which the step was taken changes nothing; `step(closure)` steps once"
    m = make_model(); opt = fo.Adam(m.parameters(), lr=1e-2)
    h = in_backward(opt)
    assert isinstance(h, InBackward) and h.active
    x = batches(1)[0]
    loss_of(m, x).backward()
    w,sd = [p.clone() for p in m.parameters()],opt.state_dict()
    opt.step(); opt.step(); opt.zero_grad()
    assert all(torch.equal(a, b) for a,b in zip(w, m.parameters()))
    assert deep_equal(sd, opt.state_dict())
    loss = opt.step(lambda: (l := loss_of(m, x)).backward() or l)   # the closure's backward steps, once
    assert loss is not None and all(s['step'] == 2 for s in opt.state.values() if s)
    assert h.stepped['passes'] == 2


def test_grads_freed_and_not_kept_by_the_fused_engine():
    m = make_model(); opt = fo.Adam(m.parameters(), lr=1e-2); opt.engine = 'fused'
    refs = []   # hooks run in the order registered: this one sees the gradient before the step's
    m.body[0].weight.register_post_accumulate_grad_hook(lambda p: refs.append(weakref.ref(p.grad)))
    in_backward(opt, bucket_bytes=0)
    for x in batches(3):
        loss_of(m, x).backward()
        assert all(p.grad is None for p in m.parameters())
    assert opt.engine.stepped['fused'] > 0
    assert len(refs) == 3 and all(r() is None for r in refs), "a gradient stepped inside backward is freed, not cached by the engine"


def test_normal_fused_steps_do_not_keep_gradients_alive():
    p = nn.Parameter(torch.randn(100)); opt = fo.Adam([p], lr=1e-3); opt.engine = 'fused'
    for _ in range(3):
        p.grad = torch.randn(100); r = weakref.ref(p.grad)
        opt.step(); opt.zero_grad(set_to_none=True)
        assert r() is None


def test_remove_restores_normal_steps():
    a = train(OPTS['adam'], 'eager', False, steps=8)
    m = make_model(); opt = OPTS['adam'](groups(m))
    xs = batches(8)
    with in_backward(opt, bucket_bytes=0) as h:
        for x in xs[:4]: loss_of(m, x).backward(); opt.step(); opt.zero_grad()
    assert not h.active and 'removed' in repr(h)
    for x in xs[4:]:
        loss_of(m, x).backward()
        assert m.body[0].weight.grad is not None   # no hooks: the gradient stays for `step`
        opt.step(); opt.zero_grad()
    same_run(a, (m, opt))


def test_frozen_parameters():
    "A parameter frozen at install gets its hook; it is stepped once unfrozen"
    def run(inb):
        m = make_model(); opt = fo.Adam(groups(m), lr=1e-2)
        m.body.requires_grad_(False)
        if inb: in_backward(opt)
        for i,x in enumerate(batches(6)):
            if i == 3: m.body.requires_grad_(True)
            loss_of(m, x).backward(); opt.step(); opt.zero_grad()
        return m, opt
    same_run(run(False), run(True))


def test_per_tensor_clipping():
    def run(inb):
        m = make_model(); opt = fo.SGD(m.parameters(), lr=0.5)
        if inb: in_backward(opt, max_norm=0.05)
        for x in batches(5):
            loss_of(m, x).backward()
            if not inb:
                for p in m.parameters():
                    if p.grad is not None: torch.nn.utils.clip_grad_norm_(p, 0.05)
            opt.step(); opt.zero_grad()
        return m
    for p,q in zip(run(False).parameters(), run(True).parameters()): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_step_hooks():
    "torch's step hooks run around `opt.step()`, as ever; a pre-hook is warned about"
    m = make_model(); opt = fo.SGD(m.parameters(), lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(m.body[0].weight.detach().clone()))
    in_backward(opt)
    w = m.body[0].weight.detach().clone()
    loss_of(m, batches(1)[0]).backward(); opt.step()
    assert len(calls) == 1 and not torch.equal(calls[0], w)   # the post hook sees the stepped weights
    opt2 = fo.SGD(make_model().parameters(), lr=0.1)
    opt2.register_step_pre_hook(lambda o, a, k: None)
    with pytest.warns(UserWarning, match='pre-hooks'): in_backward(opt2)


def test_refused():
    ps = lambda: make_model().parameters()
    opt = fo.Adam(ps(), lr=1e-3); opt.nonfinite = 'skip'
    with pytest.raises(ValueError, match='nonfinite'): in_backward(opt)
    with pytest.raises(TypeError, match='fastopt `Optimizer`'): in_backward(torch.optim.SGD(ps(), lr=0.1))
    with pytest.raises(TypeError, match='overrides `step`'): in_backward(fo.Lookahead(fo.Adam(ps(), lr=1e-3)))
    with pytest.raises(ValueError, match='bucket_bytes'): in_backward(fo.Adam(ps(), lr=1e-3), bucket_bytes=-1)
    with pytest.raises(ValueError, match='max_norm'): in_backward(fo.Adam(ps(), lr=1e-3), max_norm=0)
    opt = fo.Adam(ps(), lr=1e-3); h = in_backward(opt)
    with pytest.raises(RuntimeError, match='already steps inside backward'): in_backward(opt)
    h.remove(); in_backward(opt).remove()   # after `remove`, again
    m = make_model(); opt = fo.Adam(m.parameters(), lr=1e-3)
    in_backward(opt)
    opt.nonfinite = 'raise'   # set after the hooks: the first step inside backward refuses
    with pytest.raises(ValueError, match='nonfinite'): loss_of(m, batches(1)[0]).backward()


def test_refused_under_ddp(monkeypatch):
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda *a, **k: 2)
    with pytest.raises(RuntimeError, match='DDP'): in_backward(fo.SGD(make_model().parameters(), lr=0.1))


def test_an_error_inside_backward_leaves_the_handle_usable():
    from fastopt.zoo import ScheduleFreeAdamW
    m = make_model(); opt = ScheduleFreeAdamW(m.parameters(), lr=1e-3)
    h = in_backward(opt)
    opt.eval()
    with pytest.raises(RuntimeError, match='eval mode'): loss_of(m, batches(1)[0]).backward()
    opt.train(); opt.zero_grad(set_to_none=True)
    loss_of(m, batches(1)[0]).backward()
    assert all(p.grad is None for p in m.parameters()) and h.stepped['passes'] == 1


# -- fastai ---------------------------------------------------------------------------------------------------------

def make_learner(cbs=(), seed=0):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    import fastai.callback.progress, fastai.callback.schedule  # noqa: F401 (`no_bar`, `fit_one_cycle`, `fine_tune` on `Learner`)
    from sklearn.datasets import load_digits
    X,y = load_digits(return_X_y=True)
    X,y = torch.tensor(X[:512], dtype=torch.float32)/16,torch.tensor(y[:512])
    dls = DataLoaders.from_dsets(torch.utils.data.TensorDataset(X[:384], y[:384]), torch.utils.data.TensorDataset(X[384:], y[384:]),
                                 bs=64, shuffle=False, device='cpu', num_workers=0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 10))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=fo.Adam, cbs=list(cbs),
                    splitter=lambda m: [list(m[:3].parameters()), list(m[3].parameters())])
    return learn


def fit(learn, how):
    with learn.no_bar(), learn.no_logging(): how(learn)
    return learn


@pytest.mark.parametrize('how', [lambda l: l.fit_one_cycle(2, 1e-2), lambda l: l.fine_tune(1, 1e-2, freeze_epochs=1)],
                         ids=['fit_one_cycle', 'fine_tune'])
def test_learner_same_weights(how):
    a,b = fit(make_learner(), how),fit(make_learner([fo.StepInBackward()]), how)
    for p,q in zip(a.model.parameters(), b.model.parameters()): assert torch.equal(p, q)
    assert deep_equal(a.opt.state_dict(), b.opt.state_dict())
    cb = b.cbs.filter(lambda c: type(c).__name__ == 'StepInBackward')[0]
    assert cb.handle is None   # removed after fit: `learn.opt` steps normally again
    assert all(p.grad is None or not p.grad.any() for p in b.model.parameters())


def test_learner_refuses_conflicts():
    from fastai.callback.training import GradientAccumulation, GradientClip
    from fastopt.fastai_amp import DeviceMixedPrecision
    for cb,what in ((GradientAccumulation(128), 'GradientAccumulation'), (GradientClip(), 'GradientClip'), (DeviceMixedPrecision(), 'fp16')):
        learn = make_learner([fo.StepInBackward(), cb])
        with pytest.raises(ValueError, match=what): fit(learn, lambda l: l.fit(1))
        assert all(not getattr(c, 'handle', None) for c in learn.cbs)


def test_learner_bf16_autocast():
    "bf16 mixed precision needs no loss scaler: allowed, and the same weights as without the callback"
    from fastopt.fastai_amp import DeviceMixedPrecision
    a = fit(make_learner([DeviceMixedPrecision('bf16')]), lambda l: l.fit(1, 1e-2))
    b = fit(make_learner([DeviceMixedPrecision('bf16'), fo.StepInBackward()]), lambda l: l.fit(1, 1e-2))
    for p,q in zip(a.model.parameters(), b.model.parameters()): assert torch.equal(p, q)
