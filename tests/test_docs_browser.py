"""The docs site in a real browser: headless Chromium loads the built site from a local HTTP server.

The browser is offline but for 127.0.0.1: it sends every request for another host to a proxy that does not exist
(`--proxy-server=http://127.0.0.1:9`; loopback bypasses a proxy), and each test checks in Chrome's network log that
no page even asked for a file from elsewhere. So math must be typeset, and search must work, from the site's files.
Screenshots go to `out/` (their paths are printed; `pytest -s` shows them).

Set-up: `make browser-setup` installs Debian's chromium and chromium-driver (`make test` runs it first); if they are
still missing, this module tries the same install once, and skips with the reason only if that fails.
The site: `_docs/` as built by `make docs` earlier in the same `make test` run, if it is newer than every notebook and
library file; otherwise it is built here (`python -m fastopt.docs`).
"""
import functools, http.server, json, os, re, shutil, subprocess, sys, tempfile, threading, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT/'_docs'
SHOTS = ROOT/'out'
CHROMIUM, DRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--window-size=1280,900',
         '--proxy-server=http://127.0.0.1:9']  # offline: any other host goes to a dead proxy (loopback is never proxied)

def _install_chromium():
    "Install Debian's chromium and chromium-driver if missing; return why not, or None when they are there"
    if Path(CHROMIUM).exists() and Path(DRIVER).exists(): return None
    if not shutil.which('apt-get'): return "no apt-get on this machine"
    cmd = 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver'
    if os.geteuid() != 0: cmd = f'sudo -n sh -c "{cmd}"'
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=900)
    if Path(CHROMIUM).exists() and Path(DRIVER).exists(): return None
    return f"`{cmd}` failed (exit {r.returncode}): {(r.stderr or r.stdout)[-500:]}"

def _docs_fresh():
    "True if `_docs/build.json` exists, records no errors, and is newer than every source of the site"
    info = DOCS/'build.json'
    if not info.exists(): return False
    d = json.loads(info.read_text())
    srcs = [*(ROOT/'nbs').rglob('*.ipynb'), *(ROOT/'nbs').glob('images/*'), *(ROOT/'fastopt').rglob('*.py')]
    return not d.get('errors') and all(f.stat().st_mtime <= d['built'] for f in srcs)

@pytest.fixture(scope='module')
def site():
    "Base URL of `_docs/` served on 127.0.0.1 (a free port)"
    import fcntl
    SHOTS.mkdir(exist_ok=True)
    with open(SHOTS/'.docs-build.lock', 'w') as lock:  # pytest-xdist workers: one builds, the others wait and reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _docs_fresh(): _build_docs()
    handler = functools.partial(type('Quiet', (http.server.SimpleHTTPRequestHandler,), {'log_message': lambda *a: None}),
                                directory=str(DOCS))
    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # the browser dropping a connection early is not an error
            if not isinstance(sys.exc_info()[1], ConnectionError): super().handle_error(request, client_address)
    srv = Server(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close()

def _build_docs():
    r = subprocess.run([sys.executable, '-m', 'fastopt.docs'], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])})
    assert r.returncode == 0, f"docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

@pytest.fixture(scope='module')
def browser():
    why = _install_chromium()
    if why: pytest.skip(f"Chromium could not be installed, so the browser test cannot run: {why}")
    webdriver = pytest.importorskip('selenium.webdriver', reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix='fastopt-chromium-')
    for f in FLAGS + [f'--user-data-dir={profile}']: opts.add_argument(f)
    opts.set_capability('goog:loggingPrefs', {'performance': 'ALL'})  # the network log: every request the pages make
    drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)

def _requests(drv):
    "URLs the browser asked for since the last call, from Chrome's network log"
    msgs = (json.loads(e['message'])['message'] for e in drv.get_log('performance'))
    return [m['params']['request']['url'] for m in msgs if m['method'] == 'Network.requestWillBeSent']

def _assert_local(drv, site, what):
    "No request (in the network log, and in the page's resource timings) went anywhere but the local server"
    urls = _requests(drv) + drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    # the browser's own pages (chrome://, the start tab's) are not network requests
    far = sorted({u for u in urls if not u.startswith((site + '/', 'data:', 'blob:', 'about:', 'chrome:', 'chrome-untrusted:'))})
    assert not far, f"{what}: requests that leave 127.0.0.1: {far}"

def _shot(drv, name):
    "Save a screenshot as `out/name` and print its path"
    SHOTS.mkdir(exist_ok=True)
    drv.save_screenshot(str(SHOTS/name))
    print(f"screenshot: {SHOTS/name}")
    return SHOTS/name

def _wait(drv, js, timeout=10):
    "Poll the script `js` until it returns something truthy; return it (or the last falsy value)"
    for _ in range(int(timeout * 10)):
        if (res := drv.execute_script(js)): return res
        time.sleep(0.1)
    return res

def _load(drv, url):
    _requests(drv)  # forget earlier pages' requests
    drv.get(url)
    # wait for images (the page's own and data: URIs) to finish loading or failing
    for _ in range(100):
        if drv.execute_script("return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"): break
        time.sleep(0.1)
    return drv.execute_script("return document.body.innerText")

def _images(drv):
    return drv.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 80), i.naturalWidth])")

def _status(url):
    with urllib.request.urlopen(url, timeout=10) as r: return r.status

def test_index_page(site, browser):
    text = _load(browser, f'{site}/index.html')
    assert 'fastopt' in browser.title
    for words in ('make demo', 'make test', 'partial(Optimizer', 'Learner('): assert words in text, f"{words!r} not on the index page"
    assert _shot(browser, 'docs_index.png').stat().st_size > 10_000
    imgs = _images(browser)
    assert all(w > 0 for _, w in imgs), f"images that did not load on the index page: {[s for s, w in imgs if not w]}"
    _assert_local(browser, site, 'index.html')

def test_navigation_links_resolve(site, browser):
    pages = json.loads((DOCS/'build.json').read_text())['pages']
    for page in pages:
        _load(browser, f'{site}/{page}')
        links = browser.execute_script("return Array.from(document.querySelectorAll('nav.fo-sidebar a')).map(a => a.href)")
        hrefs = {l.split('#')[0] for l in links}
        assert {f'{site}/{p}' for p in pages} <= hrefs, f"{page}: the sidebar does not link every page: {sorted(hrefs)}"
        for h in sorted(hrefs): assert _status(h) == 200, f"{page}: navigation link {h} does not resolve"

def test_api_entries_render(site, browser):
    text = _load(browser, f'{site}/optimizer.html')
    _shot(browser, 'docs_optimizer.png')
    assert browser.find_elements('css selector', 'h3[id="Optimizer"]'), "no `Optimizer` API entry (show_doc heading)"
    sig = re.search(r"(def|class) Optimizer\(\s*params:.{0,200}?\n\s*cbs:", text, re.S)
    assert sig, "the `Optimizer` signature (params, cbs) is not rendered on optimizer.html"
    text = _load(browser, f'{site}/adaptive.html')
    assert browser.find_elements('css selector', 'h3[id="Adam"]'), "no `Adam` API entry (show_doc heading)"
    assert re.search(r'def Adam\(\s*params:.*?sqr_mom:float=0\.99', text, re.S), "the `Adam` signature is not rendered"
    assert 'A Adam/AdamW `Optimizer`' in text or 'Adam/AdamW' in text  # its docstring

def test_plots_load(site, browser):
    "Notebook plots (embedded PNGs) and the index's image files load in the browser"
    _load(browser, f'{site}/demo.html')
    imgs = _images(browser)
    assert imgs, "demo.html has no images: the notebook's plots were not rendered"
    assert all(w > 0 for _, w in imgs), f"images that did not load on demo.html: {[s for s, w in imgs if not w]}"

# Text that is still TeX: a `$...$` holding TeX's characters, or a TeX command, outside code and typeset math
_RAW_TEX = r"""const m = document.querySelector('main.fo-main').cloneNode(true);
m.querySelectorAll('.katex, pre, code, script, style').forEach(e => e.remove());
return (m.textContent.match(/\$[^$\n]*[\\^_{}][^$\n]*\$|\\(frac|sqrt|beta|eta|epsilon|leftarrow|mathrm|operatorname|hat|tilde|sum)\b/g) || []).slice(0, 5);"""

# Elements that reach past the right edge of the page's text column with no scrolling box to hold them: unreadable
_CLIPPED = """const main = document.querySelector('main.fo-main'), right = main.getBoundingClientRect().right, bad = [];
for (const e of main.querySelectorAll('*')) {
  const r = e.getBoundingClientRect();
  if (!r.width || r.right <= right + 1) continue;
  let ok = false;
  for (let p = e; p && p !== main; p = p.parentElement) {
    const s = getComputedStyle(p);
    if (s.position === 'fixed' || (p !== e && (s.overflowX === 'auto' || s.overflowX === 'scroll'))) { ok = true; break; }
  }
  if (!ok) bad.push(`${e.tagName}.${e.className} "${(e.textContent || '').trim().slice(0, 40)}" ends at ${Math.round(r.right)} > ${Math.round(right)}`);
}
return bad.slice(0, 5);"""

def test_math_typeset_offline(site, browser):
    "The adaptive page's formulas are KaTeX, with KaTeX's fonts from the site, and no TeX is left as text"
    _load(browser, f'{site}/adaptive.html')
    n = browser.execute_script("return document.querySelectorAll('.katex').length")
    assert n >= 10, f"adaptive.html: {n} typeset formulas (.katex), expected the page's ~15"
    assert not browser.find_elements('css selector', '.katex-error'), "adaptive.html: formulas KaTeX could not typeset"
    assert not browser.execute_script(_RAW_TEX), f"adaptive.html: raw TeX left: {browser.execute_script(_RAW_TEX)}"
    fonts = browser.execute_async_script("""const done = arguments[arguments.length - 1];
        document.fonts.ready.then(() => done(Array.from(document.fonts).filter(f => f.family.includes('KaTeX')).map(f => [f.family.replace(/"/g, ''), f.status])))""")
    loaded = {f for f, st in fonts if st == 'loaded'}
    assert {'KaTeX_Main', 'KaTeX_Math'} <= loaded, f"KaTeX's fonts did not load from the site: {fonts}"
    browser.execute_script("document.querySelector('.katex-display, .katex').scrollIntoView({block: 'center'})")
    _shot(browser, 'docs_adaptive_math.png')
    _assert_local(browser, site, 'adaptive.html')

def _search(drv, site, name, enter=True):
    "Type `name` in the search box of the index page, then press Enter or click the first result; return the result hrefs"
    from selenium.webdriver.common.keys import Keys
    _load(drv, f'{site}/index.html')
    box = drv.find_element('id', 'fo-search')
    box.click(); box.send_keys(name)
    hrefs = _wait(drv, "const r = document.getElementById('fo-results');"
                       "return r.hidden ? null : Array.from(r.querySelectorAll('a')).map(a => a.getAttribute('href'))")
    assert hrefs, f"searching {name!r}: no results shown"
    if name == 'Lamb': _shot(drv, 'docs_search_results_Lamb.png')
    if enter: box.send_keys(Keys.ENTER)
    else: drv.find_element('css selector', '#fo-results a').click()
    return hrefs

@pytest.mark.parametrize('name', ['Lamb', 'FusedEngine', 'BatchSizeRescale'])
def test_search_finds_api_names(site, browser, name):
    "Typing an API name and choosing the first result lands on its entry (the page and its anchor)"
    from fastopt.docs import symbol_table
    want = f"{site}/{symbol_table()[name]}"
    hrefs = _search(browser, site, name, enter=name != 'FusedEngine')  # Enter for some, a click for FusedEngine
    assert hrefs[0] == symbol_table()[name], f"searching {name!r}: the first result is {hrefs[0]}, not {symbol_table()[name]} ({hrefs[:5]})"
    url = _wait(browser, f"return location.href === {json.dumps(want)} && document.readyState === 'complete' && location.href")
    assert url == want, f"searching {name!r} and choosing the first result went to {browser.current_url}, not {want}"
    top = browser.execute_script(f"return document.getElementById({json.dumps(name)}).getBoundingClientRect().top")
    assert -2 <= top < 300, f"{name}'s entry is not at the top of the window after the jump (top={top})"  # -2: a sub-pixel scroll
    _shot(browser, f'docs_search_landed_{name}.png')
    _assert_local(browser, site, f'searching {name}')

def test_every_page_offline_toc_no_overflow(site, browser):
    "Every page: nothing from other hosts, a table of contents, math typeset, and nothing past the right edge"
    pages, bad = json.loads((DOCS/'build.json').read_text())['pages'], []
    for page in pages:
        _load(browser, f'{site}/{page}')
        try: _assert_local(browser, site, page)
        except AssertionError as e: bad.append(str(e))
        sw, cw = browser.execute_script("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        if sw > cw: bad.append(f"{page}: the page scrolls sideways ({sw} > {cw} px)")
        if (clipped := browser.execute_script(_CLIPPED)): bad.append(f"{page}: past the right edge, not scrollable: {clipped}")
        n_h2, toc = browser.execute_script("return [document.querySelectorAll('main h2[id]').length, "
                                           "document.querySelectorAll('nav.fo-toc a[href^=\"#\"]').length]")
        if n_h2 and toc < n_h2: bad.append(f"{page}: table of contents with {toc} entries for {n_h2} sections")
        if browser.find_elements('css selector', '.katex-error'): bad.append(f"{page}: formulas KaTeX could not typeset")
        if (raw := browser.execute_script(_RAW_TEX)): bad.append(f"{page}: raw TeX left: {raw}")
    assert not bad, '\n'.join(bad)
    _load(browser, f'{site}/zoo.lamb.html')
    _shot(browser, 'docs_toc_lamb_variants.png')

def test_narrow_window(site, browser):
    "At phone width the page does not scroll sideways: the sidebar stacks above, the table of contents folds"
    browser.set_window_size(480, 900)
    try:
        for page in ('index.html', 'adaptive.html', 'fused.lower.html'):
            _load(browser, f'{site}/{page}')
            sw, cw = browser.execute_script("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert sw <= cw, f"{page} at 480 px: the page scrolls sideways ({sw} > {cw} px)"
            assert not browser.execute_script(_CLIPPED), f"{page} at 480 px: {browser.execute_script(_CLIPPED)}"
        browser.execute_script("document.querySelector('nav.fo-toc').scrollIntoView()")
        _shot(browser, 'docs_narrow_fused_lower.png')
    finally: browser.set_window_size(1280, 900)
