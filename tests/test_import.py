"""`import fastopt` does not import fastai (nor pandas, matplotlib, scipy, scikit-learn): fastai's callbacks are built
the first time they are used (`_lazy_fastai` in `fastopt.optimizer`). Without fastai, what needs it says so in one line
that names the extra to install. Every check runs in a fresh process; modules are counted, never seconds."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytest.importorskip('fastai')
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ('fastai', 'pandas', 'matplotlib', 'sklearn', 'scipy')
LAZY = {'BatchSizeRescale': 'batch_size', 'BlowupGuard': 'stability', 'ScheduleFreeCallback': 'zoo_schedule_free',
        'PerExampleSqrGradCallback': 'per_example'}
MAX_EXTRA_MODULES = 120  # measured: 32 (fastopt's own modules and a few of fastcore's); importing fastai added ~2,000

def run(*args, no_fastai=None):
    """Run `python *args` in a fresh process from the repository root. `no_fastai='not installed'`: as if fastai were not
    installed (`sys.modules['fastai'] = None`, which the import system reads so); or a directory to put first on the
    path, whose `fastai` package raises the error an uninstalled fastai gives"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([str(no_fastai)] if isinstance(no_fastai, Path) else [])))
    if no_fastai == 'not installed':
        pre = "import sys; sys.modules['fastai'] = None\n"
        args = ('-c', pre + args[1]) if args[0] == '-c' else \
               ('-c', pre + f"import runpy; sys.argv[0] = 'python -m'; runpy.run_module({args[1]!r}, run_name='__main__', alter_sys=True)",
                *args[2:])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)

def _json(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])

def test_import_fastopt_loads_no_fastai_until_a_callback_is_used():
    r = _json(run('-c', f"""
import sys, json, pickle, torch
before = set(sys.modules)
import fastopt
res = dict(extra=sorted(set(sys.modules) - before), listed=[n for n in {list(LAZY)!r} if n in dir(fastopt)])
try: fastopt.NoSuchName
except AttributeError as e: res['unknown'] = str(e)
from fastopt import BatchSizeRescale  # imports fastai
from fastai.callback.core import Callback
import fastopt.batch_size, fastopt.stability, fastopt.zoo.schedule_free, fastopt.per_example
res['classes'] = {{}}
for n,m in {LAZY!r}.items():
    mod = getattr(fastopt, m)
    c = getattr(mod, n)
    res['classes'][n] = dict(same=c is getattr(fastopt, n) and c is vars(mod)[n], callback=issubclass(c, Callback),
                             name=[c.__module__, c.__qualname__], in_all=n in mod.__all__ and n in fastopt.__all__,
                             pickled=pickle.dumps(c()).hex())
ns = {{}}; exec('from fastopt import *', ns)
res['star'] = [n in ns for n in {list(LAZY)!r}]
print(json.dumps(res))
"""))
    heavy = [m for m in r['extra'] if m.split('.')[0] in HEAVY]
    assert not heavy, heavy
    assert len(r['extra']) < MAX_EXTRA_MODULES, (len(r['extra']), r['extra'])
    assert r['listed'] == list(LAZY)  # `dir(fastopt)` lists them before they are built
    assert r['unknown'] == "module 'fastopt' has no attribute 'NoSuchName'"
    assert r['star'] == [True]*len(LAZY)
    for n,c in r['classes'].items():
        assert c['same'] and c['callback'] and c['in_all'] and c['name'] == [f'fastopt.{LAZY[n]}', n], (n, c)
    # a fresh process unpickles them: `pickle` finds each class through its module's `__getattr__`
    pickles = {n: c['pickled'] for n,c in r['classes'].items()}
    assert _json(run('-c', f"""
import json, pickle
cbs = {{n: pickle.loads(bytes.fromhex(h)) for n,h in {pickles!r}.items()}}
import fastopt
print(json.dumps(all(type(cb) is getattr(fastopt, n) for n,cb in cbs.items())))
""")) is True

@pytest.fixture(params=['not installed', 'fake package'])
def no_fastai(request, tmp_path):
    if request.param == 'not installed': return request.param
    (tmp_path/'fastai').mkdir()
    (tmp_path/'fastai'/'__init__.py').write_text("raise ModuleNotFoundError(\"No module named 'fastai'\")\n")
    return tmp_path

def test_without_fastai_fastopt_works_and_the_callbacks_say_so(no_fastai):
    r = _json(run('-c', f"""
import json, torch, fastopt
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
opt = fastopt.Adam([p], lr=0.1); opt.step()
res = dict(stepped=bool((p < 1).all()), listed=[n in dir(fastopt) for n in {list(LAZY)!r}], errors=[])
for n,m in {LAZY!r}.items():
    for mod in (fastopt, getattr(fastopt, m)):
        try: getattr(mod, n); res['errors'].append('no error')
        except ImportError as e: res['errors'].append([str(e), e.__cause__ is None and e.__suppress_context__])
try: import fastopt.fastai_amp
except ImportError as e: res['amp'] = [str(e), e.__cause__ is None and e.__suppress_context__]
print(json.dumps(res))
""", no_fastai=no_fastai))
    assert r['stepped'] and r['listed'] == [True]*len(LAZY)
    expected = [[f"{mod}.{n} needs fastai: pip install 'fastopt[fastai]'", True] for n,m in LAZY.items()
                for mod in ('fastopt', f'fastopt.{m}')]
    assert r['errors'] == expected
    assert r['amp'] == ["fastopt.fastai_amp needs fastai: pip install 'fastopt[fastai]'", True]

def test_without_fastai_star_imports_work():
    "fastai not installed: `from fastopt import *` leaves its callbacks out rather than failing"
    r = _json(run('-c', f"""
import json
ns, ns2 = {{}}, {{}}
exec('from fastopt import *', ns); exec('from fastopt.per_example import *', ns2)
print(json.dumps([[n in ns for n in {list(LAZY)!r}], 'Adam' in ns, 'PerExampleAdam' in ns2]))
""", no_fastai='not installed'))
    assert r == [[False]*len(LAZY), True, True]

def test_without_fastai_commands_say_so(no_fastai):
    r = run('-m', 'fastopt.demo', '--help', no_fastai=no_fastai)
    assert r.returncode == 0 and '--opts' in r.stdout, r.stderr
    r = run('-m', 'fastopt.demo', '--epochs', '1', no_fastai=no_fastai)
    assert (r.returncode, r.stdout, r.stderr) == (1, '', "python -m fastopt.demo needs fastai: pip install 'fastopt[demo]'\n")
    r = run('-m', 'fastopt.bench', '--learner', '--opts', 'adam', '--peers', 'none', '--rounds', '1', no_fastai=no_fastai)
    assert (r.returncode, r.stdout, r.stderr) == (1, '', "python -m fastopt.bench --learner needs fastai: pip install 'fastopt[demo]'\n")
