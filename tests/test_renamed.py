"""Names that moved or were renamed keep working for a release, warn once per use with what to use instead, and give
the same objects or results as their new names."""
import warnings
import pytest, torch
import fastopt
from fastopt import Adam, fp32_math, average_grad_adam, average_sqr_grad_adam, adam_eps_step, stable_adam_step
from fastopt.sgd import tst_param


def _warned(f):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = f()
    assert len(w) >= 1 and all(issubclass(x.category, DeprecationWarning) for x in w), [str(x.message) for x in w]
    return res, str(w[0].message)


@pytest.mark.parametrize('name', ['Lion', 'Adan', 'NAdam', 'AMSGrad', 'Adamax', 'StableAdamW', 'KahanAdamW', 'ScheduleFreeAdamW',
                                  'Muon', 'LambPaper', 'LambTimm', 'is_matrix', 'zoo_optimizers'])
def test_zoo_names_at_the_top_level(name):
    obj, msg = _warned(lambda: getattr(fastopt, name))
    assert obj is getattr(fastopt.zoo, name)
    assert msg == f"`fastopt.{name}` is deprecated and will be removed in the next release: use `fastopt.zoo.{name}`"
    assert name not in fastopt.__all__ and name in fastopt.zoo.__all__


def test_moved_helpers():
    assert _warned(lambda: fastopt.tst_param)[0] is tst_param
    assert 'tst_param' not in fastopt.__all__
    assert _warned(lambda: fastopt.debiased_average_grad)[0] is average_grad_adam
    assert _warned(lambda: fastopt.debiased_average_sqr_grad)[0] is average_sqr_grad_adam
    assert _warned(lambda: fastopt.stable_adamw_step)[0] is stable_adam_step
    assert _warned(lambda: fastopt.amsgrad_step)[0] is adam_eps_step
    assert _warned(lambda: fastopt.default_engine)[0] == fastopt.get_default_engine()
    assert _warned(lambda: fastopt.rescale_batch_size)[0] is fastopt.rescale_for_batch_size
    import fastopt.bias_correction as bc
    assert _warned(lambda: bc.debias_weights)[0] is bc.corrections


def _run(make, dtype=torch.bfloat16):
    torch.manual_seed(0)
    p = torch.randn(50, dtype=dtype, requires_grad=True)
    opt = make([p])
    for i in range(5):
        p.grad = torch.randn(50, generator=torch.Generator().manual_seed(i)).to(dtype)
        opt.step()
    return p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k,v in opt.state[p].items()}


def test_old_callables_give_the_new_results():
    old, msg = _warned(lambda: _run(lambda ps: fastopt.precision.AdamWKahan(ps, lr=1e-2)))
    new = _run(lambda ps: fp32_math(Adam(ps, lr=1e-2), 'kahan'))
    assert torch.equal(old[0], new[0]) and old[1].keys() == new[1].keys()
    assert 'fp32_math(Adam(params, lr), ' in msg
    from fastopt.zoo import adam_variants as av
    from fastopt.optimizer import Optimizer
    from fastopt.adaptive import step_stat
    cbs_old = [step_stat, av.debiased_average_grad, av.debiased_average_sqr_grad, av.kahan_adam_step]
    cbs_new = [step_stat, average_grad_adam, average_sqr_grad_adam, av.kahan_adam_step]
    old,_ = _warned(lambda: _run(lambda ps: Optimizer(ps, cbs_old, lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-6)))
    assert torch.equal(old[0], _run(lambda ps: Optimizer(ps, cbs_new, lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-6))[0])


def test_old_debias_keyword():
    from fastopt.bias_correction import average_grad_debiased, DebiasedAdam
    p = tst_param(1.)
    old,msg = _warned(lambda: average_grad_debiased(p, mom=0.9, step=1, debias='none')['grad_avg'].clone())
    assert torch.equal(old, average_grad_debiased(tst_param(1.), mom=0.9, step=1, correction='none')['grad_avg'])
    assert '`correction`' in msg
    opt,_ = _warned(lambda: DebiasedAdam([tst_param(1.)], lr=1e-2, debias='min_n'))
    assert [getattr(cb, '__name__', '') for cb in opt.cbs][2] == 'average_grad_min_n'
    with pytest.raises(ValueError, match="`correction` must be one of"): DebiasedAdam([tst_param(1.)], lr=1e-2, correction='adamw')


def _words(name):
    "The words of a public name, in any order: `KahanAdamW` -> {adam, kahan, w}, `average_grad_adam` -> {adam, average, grad}"
    return tuple(sorted(w.lower() for part in name.split('_') for w in __import__('re').findall(r'[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+', part)))


def test_no_two_public_names_differ_only_in_word_order():
    import importlib, pkgutil
    names = set()
    for m in pkgutil.walk_packages(fastopt.__path__, 'fastopt.'):
        if m.name.split('.')[-1] in ('bench', 'demo', 'docs', 'cuda') or m.name.endswith('_modidx'): continue
        names |= set(getattr(importlib.import_module(m.name), '__all__', ()))
    by_words = {}
    for n in sorted(names): by_words.setdefault(_words(n), set()).add(n)
    # a class and the function that builds it (`Plan`, `plan`) are one name; other twins differ in word order
    twins = [sorted(ns) for ns in by_words.values() if len({n.lower().replace('_', '') for n in ns}) > 1]
    assert not twins, twins
    assert _words('KahanAdamW') == _words('AdamWKahan') and _words('debiased_average_grad') == _words('average_grad_debiased')
