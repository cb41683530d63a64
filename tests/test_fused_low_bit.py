"""The fused engine steps a chain wrapped in `LowBitState` in one pass over memory (codes and block scales read,
dequantized in registers, the chain run, each block's new state quantized at its end) and gives the eager wrapper's
result: codes and block scales bit for bit, the weights within a few ulps of the update (the chains' own fp32 `sqrt` and
divisions by per-step values are the engine's usual ulps); parameters below `min_size` (full-precision state) step in
their own kernel; the Triton kernels, in Triton's interpreter, give the same codes; a kernel that fails steps eagerly once"""
import os, subprocess, sys, warnings
from functools import partial
from pathlib import Path
import pytest, torch
from fastopt import Adam, Lamb, Optimizer
from fastopt.adaptive import average_grad, average_sqr_grad, step_stat
from fastopt.sgd import weight_decay
from fastopt.zoo import Lion
from fastopt.low_bit_state import LowBitState, low_bit, AdamW8bit, AdamW4bit, quantize_blockwise, dequantize_blockwise
from fastopt.fused import cpu, engine as fengine
from fastopt.fused.cpu import ulps

# 8-bit blocks of 256 and 4-bit blocks of 128: sizes not a multiple of either, odd sizes, and two below `min_size`
SHAPES = [(5000,), (70, 71), (100,), (4097,), (64, 130), (7, 3), (2048 + 129,)]

def clipped_momentum(p, lr, mom, grad_avg=None, **kwargs):
    "A user's callback: momentum of the clipped gradient, a step of its signed square root"
    if grad_avg is None: grad_avg = torch.zeros_like(p, dtype=torch.float32)
    grad_avg.mul_(mom).add_(p.grad.clamp(-1, 1))
    p.data.add_(grad_avg.sign() * grad_avg.abs().sqrt(), alpha=-lr)
    return {'grad_avg': grad_avg}

OPTS = {
    'adamw8':  lambda ps: AdamW8bit(ps, lr=1e-2, wd=0.01),
    'adamw4':  lambda ps: AdamW4bit(ps, lr=1e-2, wd=0.01),
    'lion8':   lambda ps: low_bit(Lion(ps, lr=1e-3, wd=0.1), 8),
    'lion4':   lambda ps: low_bit(Lion(ps, lr=1e-3, wd=0.1), 4),
    'lamb8':   lambda ps: low_bit(Lamb(ps, lr=1e-2, wd=0.01), 8),
    'lamb4':   lambda ps: low_bit(Lamb(ps, lr=1e-2, wd=0.01), 4),
    'user8':   lambda ps: low_bit(Optimizer(ps, [weight_decay, clipped_momentum], lr=1e-2, mom=0.9, wd=0.01), 8),
    'user4':   lambda ps: low_bit(Optimizer(ps, [weight_decay, clipped_momentum], lr=1e-2, mom=0.9, wd=0.01), 4),
    'adam_sqr_only': lambda ps: low_bit(Adam(ps, lr=1e-2), 8, keys=['sqr_avg'], block_size=64),  # one key quantized, another block size
}

def run(engine, make, dtype=torch.float32, steps=6, shapes=SHAPES, seed=0):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s) * 0.1).to(dtype)) for s in shapes]
    w0 = [p.detach().clone() for p in ps]
    opt = make(ps); opt.engine = engine
    g = torch.Generator().manual_seed(seed + 1)
    for s in range(steps):
        for p in ps: p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return ps, w0, opt

def check_same(name, dtype, steps=6):
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # no fallback, no warning
        pf,_,of = run('fused', OPTS[name], dtype, steps)
    pe,w0,oe = run('eager', OPTS[name], dtype, steps)
    assert of.engine.failed is None
    # every step after the first in a kernel; LAMB on bf16 weights: the second too (its trust ratio goes from bf16 to fp32)
    assert sum(of.engine.stepped.values()) == steps * len(pf)
    assert of.engine.stepped['fused'] >= (steps - (2 if 'lamb' in name and dtype != torch.float32 else 1)) * len(pf)
    nq = 0
    for a,b,w in zip(pf, pe, w0):
        sa,sb = of.state[a],oe.state[b]
        assert sa.keys() == sb.keys()
        for k,v in sb.items():
            if k.endswith(('_codes', '_absmax')):
                nq += 1
                assert torch.equal(sa[k], v), (name, dtype, a.shape, k, (sa[k] != v).sum().item())
            elif isinstance(v, torch.Tensor) and v.dim() > 0:
                if v.dtype == torch.float32: assert torch.equal(sa[k], v), (name, a.shape, k)
                else: assert ulps(sa[k], v).max() <= steps   # bf16 full-precision state: torch's scalar-tail ulp, per step
            elif isinstance(v, torch.Tensor): torch.testing.assert_close(sa[k], v, rtol=1e-5, atol=0)   # LAMB's trust ratio: a reduction
            else: assert sa[k] == v
        moved = (b.detach().double() - w.double()).abs()
        u = ulps(a.detach(), b.detach(), scale=moved.to(b.dtype) if b.dtype == torch.float32 else None)
        assert u.max() <= (64 if 'lamb' in name else 4 * steps), (name, dtype, a.shape, u.max().item())
    assert nq > 0   # some state was quantized

@pytest.mark.parametrize('name', list(OPTS))
def test_fused_equals_eager(name):
    check_same(name, torch.float32)

@pytest.mark.parametrize('name', ['adamw8', 'adamw4', 'lamb8', 'user4'])
def test_fused_equals_eager_bf16(name):
    check_same(name, torch.bfloat16)

def test_many_steps():
    "AdamW 4-bit over 20 steps: the quantized state never drifts from the eager one"
    check_same('adamw4', torch.float32, steps=20)

def test_state_format_and_no_full_size_copy():
    "The state stays codes and scales (no full-precision copy appears), the kernel reads the wrapper's code maps"
    pf,_,of = run('fused', OPTS['adamw8'])
    for p in pf:
        st = of.state[p]
        if p.numel() >= 4096: assert 'grad_avg' not in st and st['grad_avg_codes'].dtype == torch.uint8 and st['grad_avg_codes'].numel() == p.numel()
        else: assert 'grad_avg' in st and 'grad_avg_codes' not in st
    pf,_,of = run('fused', OPTS['adamw4'])
    p = pf[3]   # 4097 elements: 2049 bytes, the last high nibble 0
    assert of.state[p]['grad_avg_codes'].numel() == 2049 and int(of.state[p]['grad_avg_codes'][-1]) >> 4 == 0

def test_round_trip_reference():
    "The kernel's codes are `quantize_blockwise` of the state the eager chain computes from `dequantize_blockwise`"
    pf,_,of = run('fused', OPTS['adamw4'], steps=3)
    lb = of.cbs[0]
    p = pf[0]; st = of.state[p]
    v = dequantize_blockwise(st['sqr_avg_codes'], st['sqr_avg_absmax'], lb.qmap('sqr_avg'), lb.block_size, 4, p.shape)
    c,a = quantize_blockwise(v, lb.qmap('sqr_avg'), lb.block_size, 4)
    assert torch.equal(a, st['sqr_avg_absmax'])

def test_kernel_failure_steps_eagerly_once(monkeypatch):
    "A kernel refusing to run after fused steps: that step is taken once, eagerly, the state is the eager one's"
    steps,calls = 5,[0]
    real = cpu.CpuKernel.__call__
    def flaky(self, *a, **k):
        calls[0] += 1
        if calls[0] > 2: raise RuntimeError("injected: the kernel refuses its tables")
        return real(self, *a, **k)
    monkeypatch.setattr(cpu.CpuKernel, '__call__', flaky)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        pf,_,of = run('fused', OPTS['adamw8'], steps=steps)
    assert sum('injected' in str(x.message) for x in w) == 1 and of.engine.failed
    monkeypatch.setattr(cpu.CpuKernel, '__call__', real)
    pe,_,oe = run('eager', OPTS['adamw8'], steps=steps)
    for a,b in zip(pf, pe):
        assert of.state[a]['step'] == oe.state[b]['step'] == steps
        for k,v in oe.state[b].items():
            if k.endswith('_codes'): assert torch.equal(of.state[a][k], v)

def test_non_default_layout_steps_eagerly():
    "Codes the kernels cannot read (another length than the wrapper's format) step eagerly, without a kernel"
    pf,_,of = run('fused', OPTS['adamw8'], steps=2)
    p = pf[0]
    assert fengine._state_keys(p, of.state[p], of.cbs[0]) is not None
    st = dict(of.state[p]); st['grad_avg_codes'] = st['grad_avg_codes'][:-1]
    assert fengine._state_keys(p, st, of.cbs[0]) is None

def test_protocol():
    "The engine knows the wrapper by its attributes, not its class"
    lb = LowBitState([partial(average_grad, dampening=True), average_sqr_grad, step_stat], bits=8)
    assert fengine._low_bit([lb]) is lb and fengine._low_bit([lb, lb]) is None and fengine._low_bit(lb.cbs) is None

def test_triton_kernels_in_interpreter(tmp_path):
    """The CUDA (Triton) kernels of low-bit chains (8-bit and 4-bit Adam, two-pass LAMB), run on CPU tensors in Triton's
    interpreter by the engine: the eager wrapper's codes and scales bit for bit"""
    pytest.importorskip('triton', reason="the Triton kernels need triton (installed with the dev extra)")
    env = {**os.environ, 'TRITON_INTERPRET': '1', 'FASTOPT_CACHE_DIR': str(tmp_path)}
    r = subprocess.run([sys.executable, str(Path(__file__).parent/'cuda_interp_low_bit.py'), 'adam8,adam4,lamb8'],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = [l.split() for l in r.stdout.splitlines() if l.startswith('RESULT')]
    assert len(res) == 3 and all(l[2:] == ['code_diff=0', 'frac=0.00000', 'scale_rel=0.00e+00'] for l in res), res

@pytest.mark.parametrize('bits', [8, 4])
def test_nan_inf_and_zero_blocks(bits):
    "Blocks of zeros, and a nan and an inf gradient (a nan scale: the block divided by 1): the eager wrapper's codes"
    def grads(p, s, g):
        x = torch.randn(p.shape, generator=g)
        x[:512] = 0; x[-300:] = 0
        if s == 2: x[700] = float('nan'); x[1500] = float('inf')
        return x
    def go(engine):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5000) * 0.1), torch.nn.Parameter(torch.randn(4097))]
        opt = (AdamW8bit if bits == 8 else AdamW4bit)(ps, lr=1e-2); opt.engine = engine
        g = torch.Generator().manual_seed(1)
        for s in range(4):
            for p in ps: p.grad = grads(p, s, g)
            opt.step()
        return ps, opt
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        pf,of = go('fused')
    pe,oe = go('eager')
    assert of.engine.stepped['fused'] == 6
    for a,b in zip(pf, pe):
        assert torch.equal(a.isnan(), b.isnan())
        for k,v in oe.state[b].items():
            if k.endswith(('_codes', '_absmax')): torch.testing.assert_close(of.state[a][k], v, rtol=0, atol=0, equal_nan=True)

def test_inside_fp32_math():
    "`fp32_math(low_bit(...))` on bf16 weights (fp32 master copies, 8-bit moments): fused, the eager codes, the master within ulps"
    from fastopt.precision import fp32_math
    make = lambda ps: fp32_math(low_bit(Adam(ps, lr=1e-2, wd=0.01), 8))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        pf,_,of = run('fused', make, torch.bfloat16)
    pe,w0,oe = run('eager', make, torch.bfloat16)
    assert fengine._low_bit(of.cbs) is of.cbs[0].cbs[0]
    assert of.engine.failed is None and of.engine.stepped['fused'] == 5 * len(pf)
    for a,b,w in zip(pf, pe, w0):
        sa,sb = of.state[a],oe.state[b]
        assert sa.keys() == sb.keys() and ('grad_avg_codes' in sb) == (a.numel() >= 4096)
        for k,v in sb.items():
            if k.endswith(('_codes', '_absmax')): assert torch.equal(sa[k], v), (a.shape, k)
        moved = (sb['fp32_master'].double() - w.double()).abs().float()
        assert ulps(sa['fp32_master'], sb['fp32_master'], scale=moved).max() <= 24
        assert torch.equal(a.detach(), sa['fp32_master'].bfloat16())   # the weight: its master rounded once, as eager

def test_low_bit_among_other_callbacks_steps_eagerly():
    "A `LowBitState` that is not the chain's one callback: stepped eagerly, with one warning, exactly as eager"
    def make(ps):
        opt = Adam(ps, lr=1e-2)
        opt.cbs = [LowBitState(opt.cbs), lambda p, **kwargs: None]   # another callback after the wrapper
        return opt
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        pf,_,of = run('fused', make, steps=3)
    pe,_,oe = run('eager', make, steps=3)
    assert [str(x.message) for x in w if 'fused engine' in str(x.message)] and 'among other callbacks' in of.engine.failed
    for a,b in zip(pf, pe): assert torch.equal(a, b)
