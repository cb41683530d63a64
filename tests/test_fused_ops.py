"""The fused kernels compute what torch's kernels compute, op by op: bit for bit for bf16 and fp16 and for fp32's exact ops,
within a measured bound where torch's own kernels are not correctly rounded (fp32 `sqrt` and transcendentals from MKL /
SLEEF) or add in another order (reductions); whole bf16/fp16 chains within an ulp; Kahan summation survives fusion"""
import pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from fastopt import Optimizer, Adam, fp32_math
from fastopt.zoo import KahanAdamW
from fastopt.fused.cpu import ulps
from fastopt.fused.lower import rewrites
from fastopt.fused.trace import ELEMENTWISE, REDUCTIONS, CREATORS
from test_precision import mlp_problem, rel_err   # the small regression problem the precision tests use


def adamw_kahan(ps, **kw):
    "AdamW with fp32 math and Kahan-compensated rounding into bf16 params"
    return fp32_math(Adam(ps, **kw), 'kahan')

torch.set_num_threads(1)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
S = 0.3713   # a scalar no binary format holds exactly

OPS = {  # name: what the callback does with p, its gradient g and a state tensor m
    'mul_s': lambda p, g, m: p.data.mul_(S),            'mul_t': lambda p, g, m: p.data.mul_(g),
    'div_s': lambda p, g, m: p.data.div_(S),            'div_t': lambda p, g, m: p.data.div_(m.abs() + 0.5),
    'add_alpha': lambda p, g, m: p.data.add_(g, alpha=S), 'add': lambda p, g, m: p.data.add_(g),
    'add_s': lambda p, g, m: p.data.add_(S),            'sub_alpha': lambda p, g, m: p.data.sub_(g, alpha=S),
    'sub': lambda p, g, m: p.data.sub_(g),              'rsub_s': lambda p, g, m: p.data.copy_(S - g),
    'addcmul': lambda p, g, m: p.data.addcmul_(g, m, value=S), 'addcmul1': lambda p, g, m: p.data.addcmul_(g, m),
    'addcdiv': lambda p, g, m: p.data.addcdiv_(g, m.abs() + 0.5, value=S), 'addcdiv1': lambda p, g, m: p.data.addcdiv_(g, m.abs() + 0.5),
    'lerp_s': lambda p, g, m: p.data.lerp_(g, S),       'lerp_big': lambda p, g, m: p.data.lerp_(g, 0.9),
    'pow2': lambda p, g, m: p.data.copy_(g.pow(2)),     'pow3': lambda p, g, m: p.data.copy_(g.pow(3)),
    'pow_m1': lambda p, g, m: p.data.copy_(g.pow(-1)),  'pow_s': lambda p, g, m: p.data.copy_(g.abs().pow(1.7)),
    'square': lambda p, g, m: p.data.copy_(g.square()), 'sqrt': lambda p, g, m: p.data.copy_(g.abs().sqrt()),
    'rsqrt': lambda p, g, m: p.data.copy_(g.abs().rsqrt()), 'exp': lambda p, g, m: p.data.copy_(g.exp()),
    'log': lambda p, g, m: p.data.copy_(g.abs().log()), 'sign': lambda p, g, m: p.data.copy_(g.sign()),
    'abs': lambda p, g, m: p.data.copy_(g.abs()),       'neg': lambda p, g, m: p.data.copy_(-g),
    'clamp': lambda p, g, m: p.data.copy_(g.clamp(-0.5, 0.5)), 'maximum': lambda p, g, m: p.data.copy_(torch.maximum(g, m)),
    'where': lambda p, g, m: p.data.copy_(torch.where(g > 0, g, m)), 'sigmoid': lambda p, g, m: p.data.copy_(g.sigmoid()),
    'tanh': lambda p, g, m: p.data.copy_(g.tanh()),     'softplus': lambda p, g, m: p.data.copy_(torch.nn.functional.softplus(g, 2.)),
    'reciprocal': lambda p, g, m: p.data.copy_(g.reciprocal()), 'atan2': lambda p, g, m: p.data.copy_(torch.atan2(g, m)),
    'relu': lambda p, g, m: p.data.copy_(g.relu()),     'mean': lambda p, g, m: p.data.add_(g.mean()),
    'norm': lambda p, g, m: p.data.mul_(g.norm()),      'sum': lambda p, g, m: p.data.add_(g.sum()),
    'max': lambda p, g, m: p.data.add_(g.max()),
}
TRANSCENDENTAL = {'pow_s', 'exp', 'log', 'sigmoid', 'tanh', 'softplus', 'atan2'}   # libm vs torch's vector library
REDUCE = {'mean', 'norm', 'sum'}                                                  # summed in fp64 vs torch's order

def one_op(f):
    def cb(p, m=None, **kwargs):
        if m is None: m = torch.randn_like(p)
        f(p, p.grad, m)
        return {'m': m}
    cb.pure = True
    return cb

def run_op(f, dtype, engine, n=4096):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n).to(dtype)); p.grad = torch.randn(n).to(dtype)
    opt = Optimizer([p], [one_op(f)], lr=0.1, engine=engine)
    opt.step()                                  # creates `m` (eagerly on both engines)
    torch.manual_seed(5); p.grad = torch.randn(n).to(dtype)
    before = p.detach().clone()
    opt.step()
    if engine == 'fused': assert opt.engine.failed is None, opt.engine.failed
    return p.detach(), before

def test_every_traced_op_has_a_rewrite():
    assert (ELEMENTWISE | REDUCTIONS | CREATORS) - set(rewrites) <= {'tensor_where'}

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', list(OPS))
def test_reduced_precision_bit_for_bit(name, dtype):
    "bf16 and fp16: each op rounds where torch rounds, with torch's quirks (bf16 rounds `add`'s scalar and `alpha` first)"
    a,_ = run_op(OPS[name], dtype, 'fused'); b,_ = run_op(OPS[name], dtype, 'eager')
    if name == 'atan2' and dtype == torch.float16: assert ulps(a, b).max() <= 1   # libm's atan2 vs torch's, before rounding
    else: assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), (ulps(a, b).max(), int((a != b).sum()))

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('name', list(OPS))
def test_full_precision_ops(name, dtype):
    """fp32 and fp64: the arithmetic ops bit for bit; torch's `sqrt` and transcendentals come from a vector library
    whose results are within an ulp (the kernel's `sqrt` is exact): at most 2 ulps; reductions add up in another order"""
    a,before = run_op(OPS[name], dtype, 'fused'); b,_ = run_op(OPS[name], dtype, 'eager')
    if name in REDUCE: torch.testing.assert_close(a, b, atol=1e-7 if dtype == torch.float32 else 1e-14, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    elif name in TRANSCENDENTAL or name in ('sqrt', 'rsqrt'): assert ulps(a, b).max() <= 2, ulps(a, b).max()
    elif name == 'div_s': assert ulps(a, b).max() <= 1   # a multiplication by the reciprocal (`passes.exact_division`)
    else: assert torch.equal(a, b), (ulps(a, b).max(), int((a != b).sum()))

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_exact_division(dtype, monkeypatch):
    "With `exact_division`, a division by a per-step value is torch's IEEE division, bit for bit"
    from fastopt.fused import passes
    monkeypatch.setattr(passes, 'exact_division', True)
    a,_ = run_op(OPS['div_s'], dtype, 'fused'); b,_ = run_op(OPS['div_s'], dtype, 'eager')
    assert torch.equal(a, b)

def test_vector_tail():
    """torch's vector kernel for `add(a, b, alpha)` uses an fma, and its scalar loop for the last elements of a range
    does not: those elements may differ by an ulp in bf16 (the kernel always uses the fma)"""
    a,_ = run_op(OPS['add_alpha'], torch.bfloat16, 'fused', n=3000); b,_ = run_op(OPS['add_alpha'], torch.bfloat16, 'eager', n=3000)
    assert ulps(a, b).max() <= 1 and torch.equal(a[:2944], b[:2944])

# whole chains in bf16 and fp16: random compositions of the built-in callbacks
from fastopt.sgd import weight_decay, l2_reg, average_grad, momentum_step
from fastopt.adaptive import average_sqr_grad, step_stat, adam_step, rms_prop_step, qhadam_step
from functools import partial
CHAINS = {
    'adamw': [weight_decay, partial(average_grad, dampening=True), average_sqr_grad, step_stat, adam_step],
    'adam_l2': [l2_reg, partial(average_grad, dampening=True), average_sqr_grad, step_stat, adam_step],
    'sgd_mom': [weight_decay, average_grad, momentum_step],
    'rmsprop': [weight_decay, average_sqr_grad, rms_prop_step],
    'qhadam': [weight_decay, partial(average_grad, dampening=True), average_sqr_grad, step_stat, qhadam_step],
}
HYPERS = dict(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, nu_1=0.7, nu_2=1.0, beta=0.)

def run_chain(cbs, dtype, engine, h, n, steps, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
    opt = Optimizer([p], cbs, **{**HYPERS, **h}); opt.engine = engine
    for _ in range(steps):
        p.grad = (torch.randn(n, generator=g) * 0.1).to(dtype)
        opt.step()
    assert getattr(opt.engine, 'failed', None) is None
    return p.detach(), opt.state[p]

@settings(max_examples=25, **SETTINGS)
@given(chain=st.sampled_from(list(CHAINS)), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       lr=st.floats(1e-4, 3e-2), wd=st.floats(0, 0.1), mom=st.floats(0.5, 0.95), n=st.sampled_from([64, 1024, 4096, 3000, 77]),
       steps=st.integers(2, 5), seed=st.integers(0, 1000))
def test_reduced_precision_chains(chain, dtype, lr, wd, mom, n, steps, seed):
    """Whole bf16/fp16 chains: state and weights within an ulp of eager's, nearly all bit for bit; in the last elements
    of a tensor, which torch's kernels compute without fma (see `test_vector_tail`), within 3 ulps of the tensor's mean
    magnitude after a few steps (a sum that cancels is exact to its terms' ulp, not to its own)"""
    h = dict(lr=lr, wd=wd, mom=mom)
    a,sa = run_chain(CHAINS[chain], dtype, 'fused', h, n, steps, seed)
    b,sb = run_chain(CHAINS[chain], dtype, 'eager', h, n, steps, seed)
    body = n - n % 64
    def close(x, y):
        u = ulps(x, y)
        tail = ulps(x[body:], y[body:], scale=y.abs().float().mean().expand(n - body))
        return u[:body].max() <= 1 and (tail <= 3).all() and (x == y).float().mean() >= 0.97
    assert close(a, b), ulps(a, b).max()
    for k,v in sb.items():
        if isinstance(v, torch.Tensor): assert close(sa[k], v), k
        else: assert sa[k] == v

def train_mlp(make_opt, dtype, engine, steps=150, seed=0):
    w0, loss = mlp_problem(seed)
    ps = [w.to(dtype).requires_grad_() for w in w0]
    opt = make_opt(ps); opt.engine = engine
    for _ in range(steps):
        loss(ps).backward(); opt.step(); opt.zero_grad()
    assert getattr(opt.engine, 'failed', None) is None
    return torch.cat([p.detach().float().flatten() for p in ps])

@pytest.mark.parametrize('make', [lambda ps: KahanAdamW(ps, lr=1e-3, wd=0.01), lambda ps: adamw_kahan(ps, lr=1e-3, eps=1e-6, wd=0.01)],
                         ids=['KahanAdamW', 'fp32_math-kahan'])
@pytest.mark.parametrize('seed', [0, 1])
def test_kahan_survives_fusion(make, seed):
    "Kahan-compensated bf16 AdamW keeps its accuracy on the fused engine: as close to the fp32 run as eager, far closer than plain bf16"
    ref = train_mlp(make, torch.float32, 'eager', seed=seed)
    plain = rel_err(train_mlp(lambda ps: Adam(ps, lr=1e-3, eps=1e-6, wd=0.01), torch.bfloat16, 'fused', seed=seed), ref, seed)
    eager = rel_err(train_mlp(make, torch.bfloat16, 'eager', seed=seed), ref, seed)
    fused = rel_err(train_mlp(make, torch.bfloat16, 'fused', seed=seed), ref, seed)
    assert plain > 0.1 and fused < 0.02 and fused < 1.5 * eager + 1e-3, dict(plain=plain, eager=eager, fused=fused)

def test_backends_know_every_primitive():
    "Each backend has an expression for every primitive but the reductions (which the kernels' loops do)"
    from fastopt.fused.lower import PRIMITIVES, REDUCE_PRIMS
    from fastopt.fused.cpu import cpp_ops
    from fastopt.fused.cuda import triton_ops
    assert set(cpp_ops) == set(PRIMITIVES) - REDUCE_PRIMS
    assert set(triton_ops) == set(PRIMITIVES) - REDUCE_PRIMS
