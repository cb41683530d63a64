"""The fused engine never applies a step twice or half: a failure at any stage (no compiler, a compiler error, an op the
lowering does not know, a kernel that refuses to run, compile disabled) steps eagerly, exactly once, with one warning;
two optimizers step in two threads; a slow compile says so"""
import os, subprocess, sys, threading, warnings
from functools import partial
import pytest, torch
from torch import nn
from fastopt import Adam, Lamb, SGD
from fastopt.fused import cpu, engine as fengine, trace as ftrace, lower as flower

def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

def train(engine, steps=5, inject=None, at=1, opt_f=partial(Adam, lr=1e-2, wd=0.01), seed=0):
    m = model(seed); opt = opt_f(m.parameters()); opt.engine = engine
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        for s in range(steps):
            if inject and s == at: inject()
            m(torch.randn(16, 6)).pow(2).mean().backward()
            opt.step(); opt.zero_grad()
    return m, opt, [str(x.message) for x in w if 'fused engine' in str(x.message)]

@pytest.fixture
def fresh(monkeypatch, tmp_path):
    "No kernel built or cached yet in this process or on disk"
    monkeypatch.setattr(fengine, '_kernels', {})
    monkeypatch.setattr(ftrace, '_traces', {})
    monkeypatch.setenv('FASTOPT_CACHE_DIR', str(tmp_path))
    return monkeypatch

def assert_equal_models(a, b):
    for x,y in zip(a.parameters(), b.parameters()): assert torch.equal(x, y)

def no_compiler(mp): mp.setattr(cpu, 'find_cxx', lambda: None)
def bad_flags(mp): mp.setattr(cpu, 'cxx_flags', cpu.cxx_flags + ['-fno-such-flag-for-fastopt'])
def unknown_op(mp): mp.delitem(flower.rewrites, 'addcdiv')
def kernel_raises(mp):
    def boom(self, *a, **k): raise RuntimeError("injected: the kernel refuses its tables")
    mp.setattr(cpu.CpuKernel, '__call__', boom)

@pytest.mark.parametrize('inject,why', [(no_compiler, 'no C++ compiler'), (bad_flags, 'failed'), (unknown_op, 'addcdiv'),
                                        (kernel_raises, 'injected')])
def test_failure_steps_eagerly_once(fresh, inject, why):
    "A failure on the first fused step: every step is the eager step (bit for bit), one warning says why"
    me,oe,_ = train('eager')
    inject(fresh)
    mf,of,msgs = train('fused')
    assert len(msgs) == 1 and why in msgs[0], msgs
    assert why in of.engine.failed
    assert_equal_models(me, mf)
    assert all(of.state[p]['step'] == 5 for p in mf.parameters())

def test_failure_after_fused_steps(fresh):
    "A kernel failing after two fused steps: the step it failed on is taken once, eagerly, and training goes on eagerly"
    me,oe,_ = train('eager', steps=6)
    mf,of,msgs = train('fused', steps=6, inject=lambda: kernel_raises(fresh), at=3)
    assert len(msgs) == 1 and of.engine.failed
    assert all(of.state[p]['step'] == 6 for p in mf.parameters())
    for a,b in zip(me.parameters(), mf.parameters()): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

def test_compile_disabled_env():
    "With torch.compile disabled (TORCH_COMPILE_DISABLE=1) the engine still steps each parameter exactly once"
    code = ("import torch, warnings; from torch import nn; from fastopt import Adam\n"
            "def run(e):\n"
            "    torch.manual_seed(0); m = nn.Linear(30, 20); o = Adam(m.parameters(), lr=1e-2); o.engine = e\n"
            "    for s in range(4):\n"
            "        torch.manual_seed(s); m(torch.randn(8, 30)).pow(2).mean().backward(); o.step(); o.zero_grad()\n"
            "    return m, o\n"
            "(me, oe), (mf, of) = run('eager'), run('fused')\n"
            "assert of.engine.failed is None\n"
            "for a, b in zip(me.parameters(), mf.parameters()): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)\n"
            "assert all(of.state[p]['step'] == 4 for p in mf.parameters())\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'TORCH_COMPILE_DISABLE': '1'})
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]

def test_two_threads(fresh):
    "Two optimizers stepping in two threads at once (tracing and compiling at the same time too) give their sequential results"
    fs = {0: partial(Adam, lr=1e-2, wd=0.01), 1: partial(Lamb, lr=1e-2, wd=0.01), 2: partial(SGD, lr=1e-2, mom=0.9)}
    data = {s: [torch.randn(16, 6, generator=torch.Generator().manual_seed(100*s + i)) for i in range(6)] for s in fs}
    def job(s, out, barrier=None):
        m = model(s) if barrier is None else out.pop(('model', s))
        opt = fs[s](m.parameters()); opt.engine = 'fused'
        if barrier is not None: barrier.wait()
        for x in data[s]:
            m(x).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        out[s] = ([p.detach().clone() for p in m.parameters()], opt.engine.failed)
    want = {}
    for s in fs: job(s, want)
    for trial in range(10):
        fresh.setattr(fengine, '_kernels', {}); fresh.setattr(ftrace, '_traces', {})
        out, barrier = {('model', s): model(s) for s in fs}, threading.Barrier(len(fs))   # models made here: the global RNG
        ts = [threading.Thread(target=job, args=(s, out, barrier)) for s in fs]
        for t in ts: t.start()
        for t in ts: t.join()
        for s in fs:
            assert out[s][1] is None, out[s][1]
            for a,b in zip(out[s][0], want[s][0]): assert torch.equal(a, b), (trial, s)

def test_slow_compile_says_so(fresh, capfd):
    "A compile that takes longer than `say_after` prints one line: what is compiled, for which optimizer"
    fresh.setattr(cpu, 'say_after', 0.0)
    train('fused', steps=3)
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if 'compiling the fused step' in l]
    assert len(lines) == 1 and 'adam_step' in lines[0], err
