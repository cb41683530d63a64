"Low-bit optimizer state: the quantization format, the wrapper on Adam, Lamb, Lion and a user chain, state dicts, bad input"
import io, math, warnings
from functools import partial
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st
from fastopt import Adam, Lamb, Optimizer
from fastopt.zoo import Lion
from fastopt.sgd import average_grad, weight_decay
from fastopt.adaptive import average_sqr_grad, step_stat, adam_step
from fastopt.low_bit_state import (code_map, quant_midpoints, quantize_blockwise, dequantize_blockwise, LowBitState, low_bit,
                             AdamW8bit, AdamW4bit, state_bytes, full_precision_state_dict)
from state_helpers import deep_equal

torch.set_num_threads(1)
maps = [(8, True), (8, False), (4, True), (4, False)]

# --- the format ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('bits,signed', maps)
def test_code_map_shape(bits, signed):
    "2**bits sorted fp32 values in [-1, 1] or [0, 1], largest magnitude 1; 0 in all but the 4-bit unsigned map"
    m = code_map(bits, signed)
    assert m.dtype == torch.float32 and len(m) == 2**bits and (m[1:] > m[:-1]).all()
    assert m.abs().max() == 1 and (m.min() >= 0 if not signed else m.min() < 0)
    assert bool((m == 0).any()) == (signed or bits == 8)
    mid = quant_midpoints(m)
    assert torch.equal(mid, (m[:-1] + m[1:]) * 0.5) and len(mid) == 2**bits - 1

def test_code_map_matches_torchao():
    "The dynamic maps are bitsandbytes' `create_dynamic_map` (as torchao has it); the 4-bit unsigned one is torchao's zero-free linear map"
    qu = pytest.importorskip('torchao.optim.quant_utils')
    ao = lambda *a: torch.tensor(qu.create_dynamic_map(*a), dtype=torch.float32)
    assert torch.equal(code_map(8, True), ao(True)) and torch.equal(code_map(8, False), ao(False))
    assert torch.equal(code_map(4, True), ao(True, 3, 4))
    assert torch.equal(code_map(4, False), torch.linspace(0, 1, 17)[1:])

def reference_quantize(xs, qmap, B, bits):
    "The format of the shared spec, element by element in Python (fp32 arithmetic through 0-d tensors)"
    n = len(xs)
    flat = torch.tensor(xs, dtype=torch.float32)
    absmax = [flat[b*B:(b+1)*B].abs().max() for b in range(math.ceil(n / B))]
    mid = quant_midpoints(qmap)
    codes = []
    for i in range(n):
        a = absmax[i // B]
        t = flat[i] / a if a > 0 else torch.tensor(0.)
        codes.append(int((mid < t).sum()))
    if bits == 4:
        if n % 2: codes.append(0)
        codes = [codes[2*j] | (codes[2*j+1] << 4) for j in range(len(codes) // 2)]
    return torch.tensor(codes, dtype=torch.uint8), torch.stack(absmax)

@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=40), st.sampled_from(maps), st.integers(1, 9))
def test_format_is_the_spec(xs, m, B):
    "codes = number of midpoints strictly below x/absmax; 4-bit codes packed low nibble first; dequantize = map[code]*absmax"
    bits,signed = m
    if not signed: xs = [abs(x) for x in xs]
    qmap = code_map(bits, signed)
    codes,absmax = quantize_blockwise(torch.tensor(xs), qmap, B, bits)
    rc,ra = reference_quantize(xs, qmap, B, bits)
    assert torch.equal(codes, rc) and torch.equal(absmax, ra) and codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    y = dequantize_blockwise(codes, absmax, qmap, B, bits, (len(xs),))
    unpacked = torch.stack([rc & 15, rc >> 4], 1).flatten()[:len(xs)] if bits == 4 else rc
    assert torch.equal(y, qmap[unpacked.long()] * ra.repeat_interleave(B)[:len(xs)])

def worst_error(qmap, signed):
    "The largest distance from a normalized value in [-1, 1] (or [0, 1]) to its nearest map value"
    lo = -1. if signed else 0.
    return max((qmap[1:] - qmap[:-1]).max().item() / 2, qmap[0].item() - lo, 1 - qmap[-1].item())

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(maps), st.integers(1, 3000), st.floats(1e-6, 1e4))
def test_round_trip_error_bound(seed, m, n, scale):
    "Each value comes back within (half the widest gap of its map) × its block's absmax"
    bits,signed = m
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * scale
    if not signed: x = x * x
    qmap,B = code_map(bits, signed),(256 if bits == 8 else 128)
    codes,absmax = quantize_blockwise(x, qmap, B, bits)
    y = dequantize_blockwise(codes, absmax, qmap, B, bits, x.shape)
    bound = worst_error(qmap, signed) * absmax.repeat_interleave(B)[:n] * (1 + 1e-5)
    assert ((y - x).abs() <= bound).all()
    assert y.abs().max() <= x.abs().max() * (1 + 1e-6)

def test_zero_and_shapes():
    "An all-zero block has absmax 0 and comes back 0; odd lengths pack into ceil(n/2) bytes; the shape comes back"
    x = torch.zeros(3, 5)
    c,a = quantize_blockwise(x, code_map(4, True), 4, 4)
    assert c.shape == (8,) and a.shape == (4,) and (a == 0).all()
    assert torch.equal(dequantize_blockwise(c, a, code_map(4, True), 4, 4, x.shape), x)
    c,a = quantize_blockwise(torch.ones(7), code_map(4, False), 128, 4)
    assert c.shape == (4,) and c[-1] >> 4 == 0

# --- the wrapper ----------------------------------------------------------------------------------------------------

def problem(seed=0):
    "Noisy regression by a two-layer net whose weight matrices (64×96, 96×8 = 768) are both quantized with `min_size=512`"
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1536, 64, generator=g); Y = torch.tanh(X @ torch.randn(64, 8, generator=g)) + 0.3*torch.randn(1536, 8, generator=g)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 8))
    batches = iter(torch.randint(0, 1024, (10**4, 64), generator=g))
    def loss(valid=False):
        i = slice(1024, None) if valid else next(batches)
        return ((m(X[i]) - Y[i])**2).mean()
    return m, loss

def train(make_opt, steps=300, seed=0):
    "The final validation loss, the optimizer and the model after `steps` mini-batch steps"
    m,loss = problem(seed)
    opt = make_opt(m.parameters())
    for _ in range(steps):
        loss().backward(); opt.step(); opt.zero_grad()
    with torch.no_grad(): return loss(valid=True).item(), opt, m

user_chain = [weight_decay, partial(average_grad, dampening=True), average_sqr_grad, step_stat, adam_step]
makers = {
    'adam': lambda ps: Adam(ps, 3e-3),
    'lamb': lambda ps: Lamb(ps, 3e-3),
    'lion': lambda ps: Lion(ps, 3e-4),
    'user': lambda ps: Optimizer(ps, user_chain, lr=3e-3, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01),
}

@pytest.mark.parametrize('name', list(makers))
@pytest.mark.parametrize('bits', [8, 4])
def test_trains_close_to_fp32(name, bits):
    "Adam, Lamb, Lion and a hand-composed chain with low-bit moments reach a loss close to their fp32 selves"
    ref,_,_ = train(makers[name])
    got,opt,m = train(lambda ps: low_bit(makers[name](ps), bits, min_size=512))
    # 4-bit Lion lags: its momentum moves by 1% of the gradient a step (β2 = 0.99), less than a 4-bit code's spacing
    tol = 1.02 if bits == 8 else 1.2 if name == 'lion' else 1.05
    assert math.isfinite(got) and got <= ref * tol, (ref, got)
    st0 = opt.state[m[0].weight]
    assert st0['grad_avg_codes'].dtype == torch.uint8 and 'grad_avg' not in st0
    if name != 'lion': assert 'sqr_avg_codes' in st0 and 'sqr_avg' not in st0
    assert 'grad_avg' in opt.state[m[0].bias]   # 96 elements: full precision

def test_min_size_boundary_and_keys():
    "A parameter of exactly `min_size` elements is quantized, one element fewer is not; `keys` limits what is quantized"
    a,b = torch.zeros(64, requires_grad=True),torch.zeros(63, requires_grad=True)
    opt = low_bit(Adam([a, b], 1e-3), 8, block_size=16, min_size=64, keys=['sqr_avg'])
    a.grad,b.grad = torch.randn(64),torch.randn(63)
    opt.step()
    assert set(opt.state[a]) == {'grad_avg', 'sqr_avg_codes', 'sqr_avg_absmax', 'step'}
    assert set(opt.state[b]) == {'grad_avg', 'sqr_avg', 'step'}
    assert opt.state[a]['sqr_avg_absmax'].shape == (4,)

def test_unsigned_rule():
    "`sqr_avg` and `max_sqr_avg` use the unsigned map, other keys the signed one; `unsigned` overrides"
    lb = LowBitState([adam_step], bits=4)
    assert torch.equal(lb.qmap('sqr_avg'), code_map(4, False)) and torch.equal(lb.qmap('max_sqr_avg'), code_map(4, False))
    assert torch.equal(lb.qmap('grad_avg'), code_map(4, True))
    assert torch.equal(LowBitState([adam_step], 4, unsigned=['v']).qmap('v'), code_map(4, False))

def test_first_step_uses_full_precision():
    "The step's update uses the full-precision new moments: the first step equals plain Adam's exactly"
    _,_,m1 = train(makers['adam'], steps=1)
    _,_,m2 = train(lambda ps: AdamW4bit(ps, 3e-3, min_size=0), steps=1)
    assert all(torch.equal(p, q) for p,q in zip(m1.parameters(), m2.parameters()))

def test_low_bit_quantizes_existing_state():
    "`low_bit` on an optimizer that has stepped quantizes its state now and continues"
    m,loss = problem()
    opt = Adam(m.parameters(), 1e-3)
    loss().backward(); opt.step(); opt.zero_grad()
    ga = opt.state[m[0].weight]['grad_avg'].clone()
    low_bit(opt, 8, min_size=512)
    st0 = opt.state[m[0].weight]
    assert 'grad_avg' not in st0
    assert torch.equal(st0['grad_avg_codes'], quantize_blockwise(ga, code_map(8, True), 256, 8)[0])
    loss().backward(); opt.step()

def test_state_bytes_per_param():
    "8 bytes per parameter for fp32 AdamW; 2 + 8/256 for 8 bits; 1 + 8/128 for 4 bits (the bias stays fp32)"
    for mk,per in [(lambda ps: Adam(ps, 1e-3), 8.), (lambda ps: AdamW8bit(ps, 1e-3), 2 + 8/256), (lambda ps: AdamW4bit(ps, 1e-3), 1 + 8/128)]:
        torch.manual_seed(0); m = nn.Linear(256, 512)
        opt = mk(m.parameters())
        m(torch.randn(4, 256)).sum().backward(); opt.step()
        assert state_bytes(opt) == 256*512*per + 512*8
    assert AdamW8bit(nn.Linear(1, 1).parameters(), 1e-3).name == 'AdamW8bit'

def test_torch_names():
    "The ready-made ones take torch's names"
    opt = AdamW8bit(nn.Linear(2, 2).parameters(), lr=1e-3, betas=(0.8, 0.9), weight_decay=0.1)
    g = opt.param_groups[0]
    assert (g['mom'], g['sqr_mom'], g['wd']) == (0.8, 0.9, 0.1)

def test_fused_engine_steps_low_bit_state():
    """`engine='fused'` steps a low-bit chain in its kernels, without a warning: after two steps (the first eager) the state
    is the eager engine's bit for bit, the weights within ulps (tests/test_fused_low_bit.py checks many more steps)"""
    def run(engine, n):
        m,loss = problem()
        opt = AdamW8bit(m.parameters(), 3e-3, min_size=512); opt.engine = engine
        for _ in range(n): loss().backward(); opt.step(); opt.zero_grad()
        return m, opt
    me,oe = run('eager', 2)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        mf,of = run('fused', 2)
    assert of.engine.failed is None and of.engine.stepped['fused'] == 4
    for p,q in zip(me.parameters(), mf.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for k,v in oe.state[p].items():
            if isinstance(v, torch.Tensor): assert torch.equal(v, of.state[q][k]), k
    m3,o3 = run('fused', 4)   # and on: close to the eager run (the weights' ulps change the gradients)
    m4,_ = run('eager', 4)
    for p,q in zip(m3.parameters(), m4.parameters()): torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)

# --- state dicts ----------------------------------------------------------------------------------------------------

def steps(opt, loss, n):
    for _ in range(n): loss().backward(); opt.step(); opt.zero_grad()

@pytest.mark.parametrize('bits', [8, 4])
def test_resume_bit_exact(bits):
    "Save after 3 steps (torch.save, weights_only load), load into a fresh optimizer, continue: the uninterrupted run's weights"
    mk = lambda ps: low_bit(Adam(ps, 3e-3), bits, min_size=512)
    m1,l1 = problem(); o1 = mk(m1.parameters()); steps(o1, l1, 6)
    m2,l2 = problem(); o2 = mk(m2.parameters()); steps(o2, l2, 3)
    buf = io.BytesIO(); torch.save({'m': m2.state_dict(), 'o': o2.state_dict()}, buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3,l3 = problem(); m3.load_state_dict(ck['m']); o3 = mk(m3.parameters()); o3.load_state_dict(ck['o'])
    for _ in range(3): l3()   # the batches the first 3 steps took
    assert ck['o']['state'][0]['grad_avg_codes'].dtype == torch.uint8
    steps(o3, l3, 3)
    assert all(torch.equal(p, q) for p,q in zip(m1.parameters(), m3.parameters()))

def test_full_precision_both_ways():
    "`full_precision_state_dict` loads into plain Adam with the dequantized moments; plain Adam's loads into a low-bit one, quantized"
    m,loss = problem(); o8 = low_bit(Adam(m.parameters(), 3e-3), 8, min_size=512); steps(o8, loss, 2)
    full = full_precision_state_dict(o8)
    lb,st = o8.cbs[0],o8.state[m[0].weight]
    assert torch.equal(full['state'][0]['grad_avg'], lb.dequantize('grad_avg', st['grad_avg_codes'], st['grad_avg_absmax'], m[0].weight.shape))
    assert 'grad_avg_codes' not in full['state'][0] and full['state'][1]['grad_avg'].shape == (96,)
    oa = Adam(problem()[0].parameters(), 3e-3); oa.load_state_dict(full)
    assert torch.equal(oa.state_dict()['state'][0]['sqr_avg'], full['state'][0]['sqr_avg'])
    # and back: plain Adam's state dict into a fresh low-bit optimizer, quantized on the way in
    ma,la = problem(); oa = Adam(ma.parameters(), 3e-3); steps(oa, la, 2)
    sd = oa.state_dict()
    o4 = low_bit(Adam(problem()[0].parameters(), 3e-3), 4, min_size=512); o4.load_state_dict(sd)
    s4 = o4.state_dict()['state'][0]
    assert set(s4) == {'grad_avg_codes', 'grad_avg_absmax', 'sqr_avg_codes', 'sqr_avg_absmax', 'step'}
    c,a = quantize_blockwise(sd['state'][0]['sqr_avg'], code_map(4, False), 128, 4)
    assert torch.equal(s4['sqr_avg_codes'], c) and torch.equal(s4['sqr_avg_absmax'], a)
    assert torch.equal(sd['state'][0]['grad_avg'], oa.state_dict()['state'][0]['grad_avg'])   # the caller's dict untouched
    with pytest.raises(ValueError, match='full precision already'): full_precision_state_dict(oa)

def bad_cases():
    "(what, a change to the state of parameter 0 of a saved 8-bit state dict, text the error names)"
    return [
        ('codes truncated', lambda s: s.update(grad_avg_codes=s['grad_avg_codes'][:-1]), 'grad_avg_codes'),
        ('codes float', lambda s: s.update(grad_avg_codes=s['grad_avg_codes'].float()), 'grad_avg_codes'),
        ('codes 2-d', lambda s: s.update(grad_avg_codes=s['grad_avg_codes'].view(2, -1)), 'grad_avg_codes'),
        ('codes a list', lambda s: s.update(grad_avg_codes=s['grad_avg_codes'].tolist()), 'grad_avg_codes'),
        ('absmax short', lambda s: s.update(sqr_avg_absmax=s['sqr_avg_absmax'][:1]), 'sqr_avg_absmax'),
        ('absmax fp64', lambda s: s.update(sqr_avg_absmax=s['sqr_avg_absmax'].double()), 'sqr_avg_absmax'),
        ('absmax negative', lambda s: s.update(sqr_avg_absmax=-s['sqr_avg_absmax']), 'sqr_avg_absmax'),
        ('absmax nan', lambda s: s.update(sqr_avg_absmax=s['sqr_avg_absmax'] * float('nan')), 'sqr_avg_absmax'),
        ('codes alone', lambda s: s.pop('grad_avg_absmax'), 'grad_avg'),
        ('both forms', lambda s: s.update(grad_avg=torch.zeros(96, 64)), 'grad_avg'),
        ('step', lambda s: s.update(step=-1), 'step'),
    ]

@pytest.mark.parametrize('what,change,names', bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_state_dict_refused_nothing_mutated(what, change, names):
    "A bad quantized value is refused with an error naming it; the optimizer's state and groups are untouched"
    m,loss = problem(); o = low_bit(Adam(m.parameters(), 3e-3), 8, min_size=512); steps(o, loss, 2)
    sd = o.state_dict(); change(sd['state'][0]); sd['param_groups'][0]['lr'] = 0.5
    m2,l2 = problem(); o2 = low_bit(Adam(m2.parameters(), 3e-3), 8, min_size=512); steps(o2, l2, 1)
    before = {'state': {i: dict(s) for i,s in o2.state_dict()['state'].items()}, 'lr': o2.param_groups[0]['lr']}
    with pytest.raises((TypeError, ValueError), match=names):
        o2.load_state_dict(sd)
    after = {'state': {i: dict(s) for i,s in o2.state_dict()['state'].items()}, 'lr': o2.param_groups[0]['lr']}
    assert deep_equal(before, after)

def test_bits_and_keys_mismatch_refused():
    "8-bit codes do not load into a 4-bit optimizer; a quantized key the optimizer does not quantize is refused; plain Adam refuses codes"
    m,loss = problem(); o8 = low_bit(Adam(m.parameters(), 3e-3), 8, min_size=512); steps(o8, loss, 1)
    sd = o8.state_dict()
    with pytest.raises(ValueError, match='grad_avg_codes'): low_bit(Adam(problem()[0].parameters(), 1e-3), 4, min_size=512).load_state_dict(sd)
    with pytest.raises(ValueError, match='grad_avg'): low_bit(Adam(problem()[0].parameters(), 1e-3), 8, min_size=512, keys=['sqr_avg']).load_state_dict(sd)
    with pytest.raises(ValueError, match='callbacks'): Adam(problem()[0].parameters(), 1e-3).load_state_dict(sd)

@pytest.mark.parametrize('kw', [dict(bits=3), dict(bits=16), dict(bits=True), dict(bits='8'), dict(block_size=0), dict(block_size=-8),
                                dict(block_size=2.5), dict(min_size=-1), dict(keys='grad_avg'), dict(unsigned=[1])])
def test_bad_arguments(kw):
    "Bits other than 4 and 8, a block size <= 0, a negative `min_size`, a key list that is a string: refused, `opt` unchanged"
    opt = Adam(nn.Linear(2, 2).parameters(), 1e-3)
    cbs = list(opt.cbs)
    with pytest.raises((TypeError, ValueError)): low_bit(opt, **kw)
    assert opt.cbs == cbs
    with pytest.raises((TypeError, ValueError)): LowBitState([adam_step], **kw)
    if 'bits' in kw or 'block_size' in kw:
        with pytest.raises(ValueError): quantize_blockwise(torch.ones(4), code_map(8, True), kw.get('block_size', 4), kw.get('bits', 8))

def test_wrap_once():
    opt = low_bit(Adam(nn.Linear(2, 2).parameters(), 1e-3))
    with pytest.raises(ValueError, match='already'): low_bit(opt)
    with pytest.raises(TypeError): low_bit(torch.optim.SGD(nn.Linear(2, 2).parameters(), 0.1))

def test_weight_copies_stay_full_precision():
    "Copies of the weights (`FP32Math`'s, `Lookahead`'s, schedule-free's) are never quantized, whatever their size"
    lb,p = LowBitState([adam_step], min_size=0),torch.zeros(8)
    for k in ('fp32_master', 'kahan_comp', 'slow_weight', 'z'): assert not lb.quantizes(p, k, torch.zeros(8))
    assert lb.quantizes(p, 'grad_avg', torch.zeros(8)) and not lb.quantizes(p, 'step', 3) and not lb.quantizes(p, 'trust_ratio', torch.tensor(1.))

def test_bf16_params():
    "bf16 parameters: the moments are quantized from bf16 and dequantized to fp32 for the step"
    torch.manual_seed(0)
    m = nn.Linear(64, 64).to(torch.bfloat16)
    opt = AdamW8bit(m.parameters(), 1e-3, min_size=0)
    for _ in range(3):
        m(torch.randn(4, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward(); opt.step(); opt.zero_grad()
    assert m.weight.dtype == torch.bfloat16 and m.weight.isfinite().all()
    assert opt.state[m.weight]['sqr_avg_codes'].dtype == torch.uint8

def test_with_fp32_math_and_pickle():
    "Low-bit state around `FP32Math` on bf16 params: moments quantized, the fp32 master copy not; a deepcopy steps the same"
    import copy
    from fastopt.precision import fp32_math
    torch.manual_seed(0)
    m = nn.Linear(64, 64).to(torch.bfloat16)
    opt = low_bit(fp32_math(Adam(m.parameters(), 1e-3)), 8, min_size=0)
    m(torch.randn(4, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward(); opt.step()
    st = opt.state[m.weight]
    assert st['fp32_master'].dtype == torch.float32 and st['grad_avg_codes'].dtype == torch.uint8 and 'grad_avg' not in st
    opt.zero_grad()
    m2,o2 = copy.deepcopy((m, opt))   # together: the copy's optimizer holds the copy's parameters
    assert isinstance(o2.cbs[0], LowBitState) and o2.cbs[0]._on == {}
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    for mm,oo in ((m, opt), (m2, o2)): mm(x).float().pow(2).mean().backward(); oo.step()
    assert torch.equal(m.weight, m2.weight)

def test_inside_fp32_math_state_dict():
    "`fp32_math(low_bit(...))`: the codes sit inside `FP32Math`'s chain and its state dict still saves, checks and loads"
    from fastopt.precision import fp32_math
    def run(opt_sd=None, n=2):
        torch.manual_seed(0)
        m = nn.Linear(64, 64).to(torch.bfloat16)
        opt = fp32_math(low_bit(Adam(m.parameters(), 1e-3), 8, min_size=0))
        if opt_sd is not None: opt.load_state_dict(opt_sd)
        g = torch.Generator().manual_seed(1)
        for _ in range(n): m(torch.randn(4, 64, generator=g).bfloat16()).float().pow(2).mean().backward(); opt.step(); opt.zero_grad()
        return opt
    sd = run().state_dict()
    assert sd['state'][0]['grad_avg_codes'].dtype == torch.uint8
    bad = {**sd, 'state': {**sd['state'], 0: {**sd['state'][0], 'grad_avg_codes': sd['state'][0]['grad_avg_codes'][1:]}}}
    with pytest.raises(ValueError, match='grad_avg_codes'): run(bad, 0)
    assert 'grad_avg' in full_precision_state_dict(run(sd, 1))['state'][0]
    with pytest.raises(ValueError, match='already'): low_bit(run(n=0))
