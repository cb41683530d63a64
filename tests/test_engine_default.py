"""The default engine is read and set through functions (a module global copied by `import *` went stale), the
environment variable sets it at import and is checked, and a hyper-parameter check is registered through one function."""
import os, subprocess, sys
import pytest, torch
import fastopt
from fastopt import Adam, get_default_engine, set_default_engine, register_hyper_check, check_hyper
from fastopt.optimizer import hyper_checks, _real_in


def test_set_and_get_default_engine():
    before = get_default_engine()
    try:
        set_default_engine('eager')
        assert Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3).engine.name == 'eager'
        set_default_engine('fused')
        assert fastopt.get_default_engine() == 'fused' and Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3).engine.name == 'fused'
        with pytest.raises(ValueError, match="'turbo'"): set_default_engine('turbo')
        assert get_default_engine() == 'fused'   # a refused value changes nothing
    finally: set_default_engine(before)


def test_old_global_name_warns_and_reads_the_real_default():
    with pytest.warns(DeprecationWarning, match='get_default_engine'): assert fastopt.default_engine == get_default_engine()


@pytest.mark.parametrize('env,expect', [(None, 'auto'), ('eager', 'eager'), ('fused', 'fused')])
def test_environment_variable(env, expect):
    e = {k: v for k, v in os.environ.items() if k != 'FASTOPT_ENGINE'}
    if env: e['FASTOPT_ENGINE'] = env
    out = subprocess.run([sys.executable, '-c', 'import fastopt; print(fastopt.get_default_engine())'], env=e, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == expect


def test_environment_variable_checked():
    e = {**os.environ, 'FASTOPT_ENGINE': 'bogus'}
    out = subprocess.run([sys.executable, '-c', 'import fastopt'], env=e, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTOPT_ENGINE is 'bogus'" in out.stderr


def test_register_hyper_check():
    try:
        register_hyper_check('my_rate', _real_in(0, 1))
        with pytest.raises(ValueError, match='`my_rate`'): check_hyper('my_rate', 2.)
        m = torch.nn.Linear(2, 2)
        with pytest.raises(ValueError, match='`my_rate`'): fastopt.Optimizer(m.parameters(), [fastopt.sgd_step], lr=0.1, my_rate=1.5)
        with pytest.raises(TypeError, match='register_hyper_check'): register_hyper_check('x', 'not callable')
    finally: hyper_checks.pop('my_rate', None)
