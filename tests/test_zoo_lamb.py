import math, pytest, torch
from pytorch_optimizer import Lamb as RefLamb
from fastopt import Lamb
from fastopt.zoo import LambPaper, LambTimm
from zoo_helpers import run_pair, groups, max_diff, make_model

LRS = [3e-3, 1e-3]

def _ref(m, extra, **kw):
    return RefLamb(groups(m, [{'lr': LRS[0], **extra[0]}, {'lr': LRS[1], **extra[1]}]), foreach=False, **kw)

def _nonzero_model(seed):
    """The test model with its zero-initialised LayerNorm bias made non-zero: where |w| = 0 the ratio is 1 and fastai's
    debiased direction differs from the reference's raw one"""
    m = make_model(seed)
    with torch.no_grad(): m[1].bias.normal_()
    return m

def _scale_ref_lr(mom):
    "Multiply the reference's lr by 1-mom**t: it divides its step size by it, fastai's and timm's variants do not"
    def f(i, m1, m2, o1, o2):
        for g,lr in zip(o2.param_groups, LRS): g['lr'] = lr * (1 - mom**(i+1))
    return f

@pytest.mark.parametrize('decouple', [False, True])
def test_paper_matches_pytorch_optimizer(decouple):
    ours = lambda m: LambPaper(groups(m, [{'lr': LRS[0]}, {'lr': LRS[1], 'wd': 0.}]), wd=0.05, decouple_wd=decouple)
    ref = lambda m: _ref(m, [{}, {'weight_decay': 0.}], weight_decay=0.05, weight_decouple=decouple)
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5

def test_paper_weight_norm_clip_matches_pytorch_optimizer():
    def ref(m):
        o = _ref(m, [{}, {}], weight_decay=0.05, weight_decouple=False)
        o.clamp = 1.0  # binds: the first layer's weight norm is ~3
        return o
    ours = lambda m: LambPaper(groups(m, [{'lr': LRS[0]}, {'lr': LRS[1]}]), wd=0.05, max_w_norm=1.0)
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert next(m1.parameters()).norm() > 1.
    assert max_diff(m1, m2) < 1e-5
    ours10 = lambda m: LambPaper(groups(m, [{'lr': LRS[0]}, {'lr': LRS[1]}]), wd=0.05)
    assert max_diff(run_pair(ours10, ref)[0], m2) > 1e-4  # and the clip matters

def test_fastai_matches_pytorch_optimizer_where_the_math_coincides():
    "eps -> 0, ratio < 10, |w| < 10, reference step size times 1-mom**t; decay: the reference's `fixed_decay` of lr*wd"
    ours = lambda m: Lamb(groups(m, [{'lr': LRS[0]}, {'lr': LRS[1]}]), lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-10, wd=0.05)
    ref = lambda m: _ref(m, [{'weight_decay': LRS[0]*0.05}, {'weight_decay': LRS[1]*0.05}], eps=1e-10, fixed_decay=True)
    m1,m2,o1,o2 = run_pair(ours, ref, before_step=_scale_ref_lr(0.9), model=_nonzero_model)
    assert max_diff(m1, m2) < 1e-5

def test_timm_matches_pytorch_optimizer_where_the_math_coincides():
    "bias_correction=False, no trust_clip; the wd=0 group skips the ratio (the reference's `adam=True`)"
    ours = lambda m: LambTimm(groups(m, [{'lr': LRS[0]}, {'lr': LRS[1], 'wd': 0.}]), wd=0.05, bias_correction=False)
    def ref(m):
        o = _ref(m, [{}, {'weight_decay': 0., 'adam': True}], weight_decay=0.05, weight_decouple=False)
        o.clamp = math.inf
        return o
    m1,m2,o1,o2 = run_pair(ours, ref, before_step=_scale_ref_lr(0.9))
    assert max_diff(m1, m2) < 1e-5

def test_variants_differ():
    "The three variants are different optimizers on the same problem"
    mk = lambda f: (lambda m: f(m.parameters(), lr=1e-2, wd=0.05))
    a,b,c = [run_pair(mk(f), mk(f), steps=20)[0] for f in (Lamb, LambPaper, LambTimm)]
    assert min(max_diff(a, b), max_diff(b, c), max_diff(a, c)) > 1e-4

def test_defaults_and_checks():
    p = [torch.zeros(2, requires_grad=True)]
    h = LambPaper(p).hypers[0]
    assert {k: h[k] for k in ('lr','mom','sqr_mom','eps','wd','max_w_norm')} == dict(lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-6, wd=0., max_w_norm=10.)
    h = LambTimm(p).hypers[0]
    assert {k: h[k] for k in ('lr','mom','sqr_mom','eps','wd','trust_clip','always_adapt','bias_correction')} == \
        dict(lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-6, wd=0.01, trust_clip=False, always_adapt=False, bias_correction=True)
    with pytest.raises(ValueError, match='max_w_norm'): LambPaper(p, max_w_norm=-1.)
    with pytest.raises(TypeError, match='always_adapt'): LambTimm(p, always_adapt='yes')
    with pytest.raises(TypeError, match='bias_correction'): LambTimm(p, bias_correction=None)
