import random, io, pytest, torch
from torch import nn
from schedulefree import AdamWScheduleFree
from fastopt.zoo import ScheduleFreeAdamW, ScheduleFreeCallback
from zoo_helpers import run_pair, groups, max_diff

@pytest.mark.parametrize('kw,rkw', [
    (dict(), dict()),
    (dict(wd=0.05, warmup_steps=10, r=0.5, weight_lr_power=1.), dict(weight_decay=0.05, warmup_steps=10, r=0.5, weight_lr_power=1.)),
])
def test_matches_schedulefree(kw, rkw):
    def ours(m): return ScheduleFreeAdamW(groups(m, [{'lr': 3e-3}, {'mom': 0.8}]), lr=1e-3, **kw)
    def ref(m):
        o = AdamWScheduleFree(groups(m, [{'lr': 3e-3}, {'betas': (0.8, 0.999)}]), lr=1e-3, foreach=False, **rkw)
        o.train()
        return o
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5  # y
    o1.eval(); o2.eval()
    assert max_diff(m1, m2) < 1e-5  # x
    o1.train(); o2.train()
    assert max_diff(m1, m2) < 1e-5  # back to y
    p1,p2 = next(m1.parameters()),next(m2.parameters())
    assert (o1.state[p1]['z'] - o2.state[p2]['z']).abs().max() < 1e-5

def test_eval_mode_blocks_step_and_survives_state_dict():
    m = nn.Linear(3, 2)
    opt = ScheduleFreeAdamW(m.parameters(), lr=0.1)
    for _ in range(3):
        for p in m.parameters(): p.grad = torch.randn_like(p)
        opt.step()
    opt.eval()
    with pytest.raises(RuntimeError, match='train'): opt.step()
    x = [p.detach().clone() for p in m.parameters()]
    sd = opt.state_dict()
    assert sd['param_groups'][0]['train_mode'] is False
    m2 = nn.Linear(3, 2); m2.load_state_dict(m.state_dict())
    opt2 = ScheduleFreeAdamW(m2.parameters(), lr=0.1)
    opt2.load_state_dict(sd)
    opt2.train(); opt.train()
    assert all(torch.allclose(a, b) for a,b in zip(m.parameters(), m2.parameters()))
    assert not all(torch.allclose(a, b) for a,b in zip(m.parameters(), x))

def test_hyper_checks():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match='warmup_steps'): ScheduleFreeAdamW(p, warmup_steps=-1)
    with pytest.raises(TypeError, match='warmup_steps'): ScheduleFreeAdamW(p, warmup_steps=1.5)
    with pytest.raises(ValueError, match='weight_lr_power'): ScheduleFreeAdamW(p, weight_lr_power=-1.)
    with pytest.raises(ValueError, match='mom'): ScheduleFreeAdamW(p, mom=1.)
    h = ScheduleFreeAdamW(p).hypers[0]
    assert {k: h[k] for k in ('lr','mom','sqr_mom','eps','wd','warmup_steps','r','weight_lr_power')} == \
        dict(lr=0.0025, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0., warmup_steps=0, r=0., weight_lr_power=2.)
    assert isinstance(ScheduleFreeAdamW(p), torch.optim.Optimizer)

def _fit(opt_func, n_epoch=3):
    "A fastai Learner run on the digits data with `ScheduleFreeCallback`; returns the learner and the weights it saved"
    from sklearn.datasets import load_digits
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    d = load_digits()
    ds = list(zip(torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)))
    random.seed(0); torch.manual_seed(0)
    dls = DataLoaders(DataLoader(ds[:1400], bs=64, shuffle=True), DataLoader(ds[1400:], bs=256))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    valid_weights = []
    class Spy(ScheduleFreeCallback.__mro__[1]):  # a fastai Callback recording the weights validation sees
        order = 10
        def before_validate(self): valid_weights.append([p.detach().clone() for p in self.model.parameters()])
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, cbs=[ScheduleFreeCallback(), Spy()])
    with learn.no_logging(): learn.fit(n_epoch, lr=1e-2)
    buf = io.BytesIO(); torch.save(learn.model.state_dict(), buf)
    return learn,valid_weights,buf

def test_fastai_learner_uses_x_for_validation_and_saving():
    from fastai.optimizer import OptimWrapper
    l1,v1,b1 = _fit(ScheduleFreeAdamW)
    l2,v2,b2 = _fit(lambda params, lr: OptimWrapper(params, AdamWScheduleFree, lr=lr, foreach=False))
    assert len(v1) == len(v2) == 3
    for a,b in zip(v1, v2):  # every validation saw the same weights as with schedulefree's optimizer
        assert max((x - y).abs().max().item() for x,y in zip(a, b)) < 1e-5
    # and those weights are x, not y: the saved model is x, switching to train mode changes it
    saved = torch.load(io.BytesIO(b1.getvalue()))
    assert all(torch.equal(saved[k], v) for k,v in l1.model.state_dict().items())
    assert max((a - b).abs().max().item() for a,b in zip(v1[-1], l1.model.parameters())) == 0
    l1.opt.train()
    assert max((a - b).abs().max().item() for a,b in zip(v1[-1], l1.model.parameters())) > 1e-4
    l1.opt.eval()
    assert l1.validate()[0] < 1.0
