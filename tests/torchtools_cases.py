"Shared cases for test_torch_tools, test_checkpoint, test_faults and test_soak: every built-in optimizer on a tiny problem"
import sys
from functools import partial
import torch
from torch import nn
from fastopt import (SGD, RMSProp, Adam, RAdam, QHAdam, Larc, Lamb, Lookahead, ranger, load_checkpoint)

OPTS = {
    'sgd':          partial(SGD, lr=0.05),
    'sgd_mom':      partial(SGD, lr=0.05, mom=0.9, wd=0.01),
    'sgd_l2':       partial(SGD, lr=0.05, mom=0.9, wd=0.01, decouple_wd=False),
    'rmsprop':      partial(RMSProp, lr=1e-2),
    'rmsprop_mom':  partial(RMSProp, lr=1e-2, mom=0.9),
    'adam':         partial(Adam, lr=1e-2),
    'adam_l2':      partial(Adam, lr=1e-2, decouple_wd=False),
    'radam':        partial(RAdam, lr=1e-2, wd=0.01),
    'qhadam':       partial(QHAdam, lr=1e-2),
    'larc':         partial(Larc, lr=0.5),
    'lars':         partial(Larc, lr=0.5, clip=False),
    'lamb':         partial(Lamb, lr=1e-2, wd=0.01),
    'ranger':       partial(ranger, lr=1e-2, k=3),
    'lookahead_sgd': lambda ps: Lookahead(SGD(ps, lr=0.05, mom=0.9), k=2),
}

def make_model(seed=0, dtype=torch.float32):
    "A tiny MLP"
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)

def make(name, seed=0, engine=None, sched=False, **kw):
    "Model, optimizer `name` (on `engine`), and a OneCycleLR scheduler if `sched`"
    model = make_model(seed)
    params = [list(model[0].parameters()), list(model[2].parameters())]  # two groups
    opt = OPTS[name](params, **kw)
    if engine is not None: opt.engine = engine
    s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2*opt.param_groups[0]['lr'], total_steps=10_000) if sched else None
    return model, opt, s

def batch(step, bs=8):
    "The batch of step `step`: the same in every process"
    g = torch.Generator().manual_seed(step)
    x = torch.randn(bs, 6, generator=g)
    return x, torch.sin(x[:, :3]) + 0.1*torch.randn(bs, 3, generator=g)

def train(model, opt, sched, start, n, bad_every=0):
    "Steps `start`..`start+n-1`; with `bad_every`, every `bad_every`-th step gets a nan gradient"
    for i in range(start, start+n):
        x,y = batch(i)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)), y.to(next(model.parameters()).dtype)).backward()
        if bad_every and i % bad_every == bad_every-1: next(model.parameters()).grad[0, 0] = float('nan')
        opt.step()
        if sched is not None: sched.step()

def snapshot(model, opt):
    "Parameters, every state value (cloned) and the hypers, keyed by position"
    ps = [p.detach().clone() for p in model.parameters()]
    st = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k,v in opt.state[p].items()} for p in model.parameters()]
    hy = [dict(h) for h in opt.hypers]
    extra = {'count': getattr(opt, 'count', None), 'skipped': opt.skipped_steps}
    return {'params': ps, 'state': st, 'hypers': hy, 'extra': extra}

def assert_same(a, b, what=''):
    "Bit-exact comparison of two snapshots (or nested values)"
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{what}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in a: assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{what}: {a} != {b}"
        for i,(x,y) in enumerate(zip(a, b)): assert_same(x, y, f"{what}[{i}]")
    else: assert a == b and type(a) == type(b), f"{what}: {a!r} != {b!r}"

def resume_main(jobs_file):
    "Subprocess entry: for each job, build a fresh model/optimizer, load its checkpoint (weights_only), train, save a snapshot"
    torch.set_num_threads(1)
    jobs = torch.load(jobs_file, weights_only=True)
    for job in jobs:
        model, opt, sched = make(job['name'], seed=123, engine=job['engine'], sched=job['sched'])  # another seed: all must come from the file
        if job['bad_every']: opt.nonfinite = 'skip'  # a setting, like the engine: not part of the state
        ck = load_checkpoint(job['ckpt'], opt, model)
        if sched is not None: sched.load_state_dict(ck['scheduler'])
        train(model, opt, sched, ck['step'], job['m'], bad_every=job['bad_every'])
        torch.save(snapshot(model, opt), job['out'])

if __name__ == '__main__': resume_main(sys.argv[1])
