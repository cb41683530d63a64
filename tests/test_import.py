"""`import fastopt` does not import fastai (nor pandas, matplotlib, scipy, scikit-learn): fastai's callbacks are built
the first time they are used (`_lazy_fastai` in `fastopt.optimizer`). Without fastai, what needs it says so in one line
that names the extra to install. Every check runs in a fresh process; modules are counted, never seconds."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytest.importorskip('fastai')
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ('fastai', 'pandas', 'matplotlib', 'sklearn', 'scipy')
# the fastai callbacks built on first use: package -> {name: module of the package that defines it}
LAZY = {'fastopt': {'BatchSizeRescale': 'batch_size', 'BlowupGuard': 'stability', 'PerExampleSqrGradCallback': 'per_example'},
        'fastopt.zoo': {'ScheduleFreeCallback': 'schedule_free'}}
TOOLS = ('fastopt.bench', 'fastopt.demo', 'fastopt.docs')   # commands, never imported by `import fastopt`
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
import sys, json, pickle, importlib, torch
before = set(sys.modules)
import fastopt
res = dict(extra=sorted(set(sys.modules) - before), listed=[n for p,ns in {LAZY!r}.items() for n in ns if n in dir(importlib.import_module(p))])
try: fastopt.NoSuchName
except AttributeError as e: res['unknown'] = str(e)
from fastopt import BatchSizeRescale  # imports fastai
from fastai.callback.core import Callback
res['classes'] = {{}}
for p,names in {LAZY!r}.items():
    pkg = importlib.import_module(p)
    for n,m in names.items():
        mod = importlib.import_module(f'{{p}}.{{m}}')
        c = getattr(mod, n)
        res['classes'][n] = dict(same=c is getattr(pkg, n) and c is vars(mod)[n], callback=issubclass(c, Callback),
                                 name=[c.__module__, c.__qualname__, p, m], in_all=n in mod.__all__ and n in pkg.__all__,
                                 pickled=pickle.dumps(c()).hex())
res['star'] = []
for p,names in {LAZY!r}.items():
    ns = {{}}; exec(f'from {{p}} import *', ns)
    res['star'] += [n in ns for n in names]
print(json.dumps(res))
"""))
    heavy = [m for m in r['extra'] if m.split('.')[0] in HEAVY]
    assert not heavy, heavy
    assert len(r['extra']) < MAX_EXTRA_MODULES, (len(r['extra']), r['extra'])
    assert not [m for m in r['extra'] if m in TOOLS], r['extra']   # the tools stay out of the runtime import path
    assert r['listed'] == [n for ns in LAZY.values() for n in ns]  # `dir` lists them before they are built
    assert r['unknown'] == "module 'fastopt' has no attribute 'NoSuchName'"
    assert r['star'] == [True]*len(r['listed'])
    for n,c in r['classes'].items():
        p,m = c['name'][2:]
        assert c['same'] and c['callback'] and c['in_all'] and c['name'][:2] == [f'{p}.{m}', n], (n, c)
    # a fresh process unpickles them: `pickle` finds each class through its module's `__getattr__`
    pickles = {n: c['pickled'] for n,c in r['classes'].items()}
    assert _json(run('-c', f"""
import json, pickle
cbs = {{n: pickle.loads(bytes.fromhex(h)) for n,h in {pickles!r}.items()}}
import fastopt, fastopt.zoo
print(json.dumps(all(type(cb) is getattr(fastopt.zoo if n == 'ScheduleFreeCallback' else fastopt, n) for n,cb in cbs.items())))
""")) is True

@pytest.fixture(params=['not installed', 'fake package'])
def no_fastai(request, tmp_path):
    if request.param == 'not installed': return request.param
    (tmp_path/'fastai').mkdir()
    (tmp_path/'fastai'/'__init__.py').write_text("raise ModuleNotFoundError(\"No module named 'fastai'\")\n")
    return tmp_path

def test_without_fastai_fastopt_works_and_the_callbacks_say_so(no_fastai):
    r = _json(run('-c', f"""
import json, importlib, torch, fastopt
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
opt = fastopt.Adam([p], lr=0.1); opt.step()
res = dict(stepped=bool((p < 1).all()), listed=[n in dir(importlib.import_module(p)) for p,ns in {LAZY!r}.items() for n in ns], errors=[])
for p,names in {LAZY!r}.items():
    for n,m in names.items():
        for mod in (importlib.import_module(p), importlib.import_module(f'{{p}}.{{m}}')):
            try: getattr(mod, n); res['errors'].append('no error')
            except ImportError as e: res['errors'].append([str(e), e.__cause__ is None and e.__suppress_context__])
try: import fastopt.fastai_amp
except ImportError as e: res['amp'] = [str(e), e.__cause__ is None and e.__suppress_context__]
print(json.dumps(res))
""", no_fastai=no_fastai))
    assert r['stepped'] and r['listed'] == [True]*len(r['listed'])
    expected = [[f"{mod}.{n} needs fastai: pip install 'fastopt[fastai]'", True] for p,ns in LAZY.items() for n,m in ns.items()
                for mod in (p, f'{p}.{m}')]
    assert r['errors'] == expected
    assert r['amp'] == ["fastopt.fastai_amp needs fastai: pip install 'fastopt[fastai]'", True]

def test_without_fastai_star_imports_work():
    "fastai not installed: `from fastopt import *` leaves its callbacks out rather than failing"
    r = _json(run('-c', f"""
import json
ns, ns2 = {{}}, {{}}
exec('from fastopt import *', ns); exec('from fastopt.per_example import *', ns2)
ns3 = {{}}; exec('from fastopt.zoo import *', ns3)
print(json.dumps([[n in ns for n in {list(LAZY['fastopt'])!r}], 'Adam' in ns, 'PerExampleAdam' in ns2, 'ScheduleFreeCallback' in ns3, 'Lion' in ns3]))
""", no_fastai='not installed'))
    assert r == [[False]*len(LAZY['fastopt']), True, True, False, True]

def test_without_fastai_commands_say_so(no_fastai):
    r = run('-m', 'fastopt.demo', '--help', no_fastai=no_fastai)
    assert r.returncode == 0 and '--opts' in r.stdout, r.stderr
    r = run('-m', 'fastopt.demo', '--epochs', '1', no_fastai=no_fastai)
    assert (r.returncode, r.stdout, r.stderr) == (1, '', "python -m fastopt.demo needs fastai: pip install 'fastopt[demo]'\n")
    r = run('-m', 'fastopt.bench', '--learner', '--opts', 'adam', '--peers', 'none', '--rounds', '1', no_fastai=no_fastai)
    assert (r.returncode, r.stdout, r.stderr) == (1, '', "python -m fastopt.bench --learner needs fastai: pip install 'fastopt[demo]'\n")
