"Every public name has a docstring and a `show_doc` entry in the notebook that exports it."
import importlib, json, pkgutil, re
from functools import partial
from pathlib import Path
import pytest
import fastopt

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
# every module, those of subpackages included (`fused.engine`); a package's own `__init__` is hand-written and re-exports them
MODULES = sorted(m.name[len('fastopt.'):] for m in pkgutil.walk_packages(fastopt.__path__, 'fastopt.')
                 if not m.ispkg and not m.name.split('.')[-1].startswith('_'))

def _code_and_md(nb_path):
    cells = json.loads(nb_path.read_text())['cells']
    src = lambda c: ''.join(c['source']) if isinstance(c['source'], list) else c['source']
    return [src(c) for c in cells if c['cell_type'] == 'code'], [src(c) for c in cells if c['cell_type'] == 'markdown']

def _notebooks_for(mod):
    "Notebooks whose `default_exp` (or an `#| export mod` cell) targets `fastopt.mod`"
    res = []
    for f in sorted(NBS.glob('*.ipynb')):
        code, _ = _code_and_md(f)
        if any(re.search(rf'^\s*#\|\s*(default_exp|export)\s+{re.escape(mod)}\s*$', c, re.M) for c in code): res.append(f)
    return res

def _own_doc(o):
    if isinstance(o, partial): return o.__doc__ if o.__doc__ != partial.__doc__ else None
    return getattr(o, '__doc__', None)

def test_every_module_has_a_notebook():
    assert MODULES, "no fastopt modules found"
    missing = [m for m in MODULES if not _notebooks_for(m)]
    assert not missing, f"modules not exported from any notebook in nbs/: {missing}"

@pytest.mark.parametrize('mod', MODULES)
def test_public_names_documented(mod):
    try: m = importlib.import_module(f'fastopt.{mod}')
    except ImportError as e: pytest.skip(f"fastopt.{mod} needs an optional dependency: {e}")
    names = getattr(m, '__all__', None)
    assert names is not None, f"fastopt.{mod} has no __all__ (nbdev writes one for exported names)"
    code, md = [], []
    for f in _notebooks_for(mod):
        c, d = _code_and_md(f); code += c; md += d
    shown = set(re.findall(r'^\s*show_doc\(\s*([\w.]+)', '\n'.join(code), re.M))
    no_doc, no_show, data_undocumented = [], [], []
    for n in names:
        o = getattr(m, n)
        if callable(o):
            if not (_own_doc(o) or '').strip(): no_doc.append(n)
            if n not in shown: no_show.append(n)
        elif n not in shown and not any(f'`{n}`' in s for s in md): data_undocumented.append(n)
    assert not no_doc, f"fastopt.{mod}: public names without a docstring: {no_doc}"
    assert not no_show, f"fastopt.{mod}: public names without a show_doc(...) cell in their notebook: {no_show}"
    assert not data_undocumented, f"fastopt.{mod}: public non-callables neither show_doc'ed nor described (`name`) in markdown: {data_undocumented}"

def test_top_level_names_documented():
    "Everything `import fastopt` exposes comes from a module whose names are checked above"
    for n in (n for n in dir(fastopt) if not n.startswith('_')):
        o = getattr(fastopt, n)
        if isinstance(o, type(fastopt)): continue  # submodules
        mods = [mod for mod in MODULES if n in getattr(importlib.import_module(f'fastopt.{mod}'), '__all__', ())]
        assert mods, f"fastopt.{n} is not in any module's __all__"
