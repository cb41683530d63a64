"Mixed precision: fp32 math for bf16/fp16 params, Kahan summation against torch-optimi, autocast and fastai on the CPU"
import io, warnings
import pytest, torch
from torch import nn
import optimi
import fastopt
from fastopt import Adam, SGD, RAdam, Lamb
from fastopt.precision import FP32Math, fp32_math, precision_modes


def adamw_kahan(ps, **kw):
    "AdamW with fp32 math and Kahan-compensated rounding into bf16 params"
    return fp32_math(Adam(ps, **kw), 'kahan')

torch.set_num_threads(1)

def mlp_problem(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 16, generator=g); Y = X @ torch.randn(16, 4, generator=g) + 0.1*torch.randn(256, 4, generator=g)
    w0 = [torch.randn(16, 32, generator=g)*0.3, torch.randn(32, generator=g)*0.1, torch.randn(32, 4, generator=g)*0.2, torch.zeros(4)]
    def loss(ps):
        w1,b1,w2,b2 = [p.float() for p in ps]
        return ((torch.tanh(X@w1 + b1)@w2 + b2 - Y)**2).mean()
    return w0, loss

def train(make_opt, dtype, steps=150, seed=0, ps=None):
    w0, loss = mlp_problem(seed)
    ps = [w.to(dtype).requires_grad_() for w in w0]
    opt = make_opt(ps)
    for _ in range(steps):
        loss(ps).backward(); opt.step(); opt.zero_grad()
    return torch.cat([p.detach().float().flatten() for p in ps])

def rel_err(w, ref, seed):
    w0 = torch.cat([w.flatten() for w in mlp_problem(seed)[0]])
    return ((w - ref).norm() / (ref - w0).norm()).item()

def ohp(lr, wd=0.01): return dict(lr=lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, foreach=False)

def test_fp32_params_unchanged_by_wrapper():
    "On fp32 params every mode runs exactly the unwrapped chain, bit for bit"
    ref = train(lambda ps: Adam(ps, lr=1e-2), torch.float32, steps=20)
    for mode in precision_modes:
        got = train(lambda ps: fp32_math(Adam(ps, lr=1e-2), mode), torch.float32, steps=20)
        assert torch.equal(got, ref), mode

def test_adamw_kahan_fp32_matches_optimi():
    "With fp32 params, fp32_math(Adam, kahan) is AdamW: optimi's AdamW within 1e-5 over 100 steps"
    a = train(lambda ps: adamw_kahan(ps, lr=3e-3, eps=1e-6, wd=0.05), torch.float32, steps=100, seed=3)
    b = train(lambda ps: optimi.AdamW(ps, **ohp(3e-3, 0.05)), torch.float32, steps=100, seed=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

@pytest.mark.parametrize('lr,seed', [(1e-3, 0), (1e-4, 1)])
def test_bf16_kahan_and_master_close_to_fp32(lr, seed):
    "Kahan (fastopt and optimi) and the fp32 master are far closer to the fp32 run than plain bf16 AdamW"
    hp = dict(lr=lr, eps=1e-6, wd=0.01)
    ref = train(lambda ps: Adam(ps, **hp), torch.float32, seed=seed)
    plain = rel_err(train(lambda ps: Adam(ps, **hp), torch.bfloat16, seed=seed), ref, seed)
    optimi_plain = rel_err(train(lambda ps: optimi.AdamW(ps, kahan_sum=False, **ohp(lr)), torch.bfloat16, seed=seed), ref, seed)
    fk = train(lambda ps: adamw_kahan(ps, **hp), torch.bfloat16, seed=seed)
    ok = train(lambda ps: optimi.AdamW(ps, kahan_sum=True, **ohp(lr)), torch.bfloat16, seed=seed)
    fm = train(lambda ps: fp32_math(Adam(ps, **hp), 'master'), torch.bfloat16, seed=seed)
    errs = dict(plain=plain, optimi_plain=optimi_plain, fastopt_kahan=rel_err(fk, ref, seed),
                optimi_kahan=rel_err(ok, ref, seed), master=rel_err(fm, ref, seed))
    assert plain > 0.1 and optimi_plain > 0.1, errs  # the problem does show bf16's loss of small updates
    for k in ('fastopt_kahan', 'optimi_kahan', 'master'): assert errs[k] < plain / 5, errs
    # the stated tolerance: fastopt's and optimi's Kahan AdamW within 5% of the distance the fp32 run travelled
    assert rel_err(fk, ok, seed) < 0.05, (rel_err(fk, ok, seed), errs)

@pytest.mark.parametrize('make', [lambda ps: SGD(ps, lr=1e-2, mom=0.9), lambda ps: RAdam(ps, lr=1e-3),
                                  lambda ps: Lamb(ps, lr=1e-3)], ids=['SGD', 'RAdam', 'Lamb'])
def test_other_optimizers_in_fp32_math(make):
    "Any chain gains from the master copy, fp16 params included"
    ref = train(make, torch.float32, steps=100)
    for dtype in (torch.bfloat16, torch.float16):
        plain = rel_err(train(make, dtype, steps=100), ref, 0)
        master = rel_err(train(lambda ps: fp32_math(make(ps), 'master'), dtype, steps=100), ref, 0)
        assert master < plain / 2, (dtype, plain, master)

def test_state_dtypes_and_mixed_group():
    "fp32 state for bf16 params; an fp32 param in the same group gets no master/compensation"
    a = torch.randn(5, dtype=torch.bfloat16, requires_grad=True); b = torch.randn(3, requires_grad=True)
    for mode,key in [('kahan', 'kahan_comp'), ('master', 'fp32_master'), ('round', None)]:
        opt = fp32_math(Adam([a, b], lr=1e-3), mode)
        (a.float().sum() + b.sum()).backward(); opt.step(); opt.zero_grad()
        sa, sb = opt.state[a], opt.state[b]
        assert sa['grad_avg'].dtype == sa['sqr_avg'].dtype == torch.float32 and a.dtype == torch.bfloat16
        if key: assert key in sa and key not in sb
        assert sorted(sb) == ['grad_avg', 'sqr_avg', 'step']

@pytest.mark.parametrize('mode', ['kahan', 'master'])
def test_checkpoint_resume_bit_exact(mode):
    "`kahan_comp`/`fp32_master` are state: save, load in a fresh optimizer, continue == uninterrupted"
    w0, loss = mlp_problem(2)
    def fresh(): return [w.bfloat16().requires_grad_() for w in w0]
    def steps(ps, opt, n):
        for _ in range(n): loss(ps).backward(); opt.step(); opt.zero_grad()
    ps = fresh(); opt = fp32_math(Adam(ps, lr=1e-3), mode); steps(ps, opt, 10)
    buf = io.BytesIO(); torch.save({'opt': opt.state_dict(), 'ps': [p.detach() for p in ps]}, buf); buf.seek(0)
    steps(ps, opt, 10)
    ck = torch.load(buf, weights_only=True)
    ps2 = [p.clone().requires_grad_() for p in ck['ps']]
    opt2 = fp32_math(Adam(ps2, lr=1e-3), mode); opt2.load_state_dict(ck['opt'])
    assert opt2.state[ps2[0]][f"{'kahan_comp' if mode == 'kahan' else 'fp32_master'}"].dtype == (torch.bfloat16 if mode == 'kahan' else torch.float32)
    steps(ps2, opt2, 10)
    for p,q in zip(ps, ps2): assert torch.equal(p, q)

def test_bad_input():
    opt = Adam([torch.randn(2, requires_grad=True)], lr=1e-3)
    with pytest.raises(TypeError, match='fastopt `Optimizer`'): fp32_math(torch.optim.SGD([torch.randn(2, requires_grad=True)], lr=1), 'kahan')
    with pytest.raises(ValueError, match='`mode` must be one of'): fp32_math(opt, 'fp64')
    assert not any(isinstance(cb, FP32Math) for cb in opt.cbs)  # nothing changed
    fp32_math(opt, 'kahan')
    with pytest.raises(ValueError, match='already'): fp32_math(opt, 'master')

def test_autocast_bf16_params_kahan():
    "bf16 params, a bf16 autocast forward on the CPU, fp32_math(Adam, kahan): trains like the fp32 run"
    def run(dtype, make):
        torch.manual_seed(0)
        X = torch.randn(128, 16); Y = X @ torch.randn(16, 1)
        m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).to(dtype)
        opt = make(m.parameters()); losses = []
        for _ in range(80):
            with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(m(X).float(), Y)
            loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
        return losses
    l32 = run(torch.float32, lambda ps: Adam(ps, lr=3e-3))
    lk = run(torch.bfloat16, lambda ps: adamw_kahan(ps, lr=3e-3))
    assert lk[-1] < lk[0] / 5
    assert abs(lk[-1] - l32[-1]) < 0.05 * l32[0]

@pytest.mark.parametrize('amp_mode', ['bf16', 'fp16'])
def test_fastai_device_mixed_precision(amp_mode):
    "`DeviceMixedPrecision` autocasts on the CPU in a fastai Learner with a fastopt optimizer (fp16: with a CPU GradScaler)"
    from fastai.basics import Learner, DataLoaders, MSELossFlat, Callback
    from fastopt.fastai_amp import DeviceMixedPrecision
    class PredDtype(Callback):
        order = 9
        def after_pred(self): self.learn.pred_dtypes = getattr(self.learn, 'pred_dtypes', set()) | {self.pred.dtype}
    torch.manual_seed(0)
    X = torch.randn(256, 8); Y = X @ torch.randn(8, 1)
    dls = DataLoaders.from_dsets(list(zip(X, Y)), list(zip(X[:64], Y[:64])), bs=64, device='cpu')
    learn = Learner(dls, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), loss_func=MSELossFlat(),
                    opt_func=fastopt.Adam, cbs=[DeviceMixedPrecision(amp_mode=amp_mode), PredDtype()])
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # no "Disabling autocast" warning
        learn.fit(3, 1e-2)
    assert learn.pred_dtypes == {torch.bfloat16 if amp_mode == 'bf16' else torch.float16}
    vals = learn.recorder.values
    assert vals[-1][1] < vals[0][1]
    assert isinstance(learn.opt, torch.optim.Optimizer)

def test_lookahead_kahan_helps_master_refused():
    "ranger (Lookahead) writes the weights outside the chain: 'master' is refused, 'kahan' still helps"
    from fastopt import ranger
    mk = lambda ps: ranger(ps, lr=1e-3)
    ref = train(mk, torch.float32, steps=120)
    plain = rel_err(train(mk, torch.bfloat16, steps=120), ref, 0)
    kahan = rel_err(train(lambda ps: fp32_math(mk(ps), 'kahan'), torch.bfloat16, steps=120), ref, 0)
    assert kahan < plain / 1.5, (plain, kahan)
    with pytest.raises(ValueError, match="mode='kahan'"): fp32_math(mk([torch.zeros(2, requires_grad=True)]), 'master')
