"""The README and the documentation stay true: every ```python block runs, the headline table is the records',
the generated tables come from the records, links point at files that exist, and the version is one.

The code blocks of a page run in order in one namespace, in a temporary folder, as a reader would paste them.
The README's blocks run exactly as written. The guides' blocks run at tiny sizes: ``_tiny`` lowers step counts,
epochs and sample counts written as literals (``iterations=2000`` becomes ``iterations=2``), and ``_PRELUDE``
gives the names a guide's snippet takes from the reader (``teacher``, ``student``, ``x``, ...). A block that is
not meant to run is marked ``<!-- docs-test: skip (why) -->`` on the line before it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import exml_fast
from exml_fast.data import find_data_root

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b")
FENCE = re.compile(r"^(\s*)```python\s*$")


def _records():
    spec = importlib.util.spec_from_file_location("exml_records", DOCS / "_ext" / "exml_records.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("exml_records", mod)
    spec.loader.exec_module(mod)
    return mod


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, skipped) of every ```python block of a Markdown file, dedented."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group(1)), i + 1
        prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        j = start
        while not lines[j].strip().startswith("```"):
            j += 1
        code = "\n".join(ln[indent:] for ln in lines[start:j])
        blocks.append((start, code, bool(SKIP.search(prev))))
        i = j + 1
    return blocks


def doc_pages() -> list[Path]:
    return [README] + sorted(p for p in DOCS.glob("*.md"))


# --- the code blocks ---------------------------------------------------------------------------------------------

_TINY = [
    (re.compile(r"\b(iterations|synth_iterations)=\d[\d_]*"), r"\1=2"),
    (re.compile(r"\bepochs=\d+"), "epochs=1"),
    (re.compile(r"\bbuffer_size=\d+"), "buffer_size=40"),
    (re.compile(r"\bbatch_size=\d+"), "batch_size=8"),
    (re.compile(r"\.(synthesize|fit)\(\s*\d[\d_]*"), r".\1(8"),
    (re.compile(r"\.synthesize\(n\b"), ".synthesize(8"),
    (re.compile(r"\bcheckpoint_every=\d+"), "checkpoint_every=1"),
    (re.compile(r'"iterations": \d+'), '"iterations": 2'),
    (re.compile(r'make_scenario\(("\w+"),'),
     r"make_scenario(\1, max_train_per_experience=200, max_test_per_experience=200,"),
]


# A delegator fitted for two steps cannot find every class for a class-balanced draw: keep every draw instead.
_PAGE_TINY = {"generators.md": [(re.compile(r"GenerativeSynthesizer\(teacher,"),
                                  "GenerativeSynthesizer(teacher, balance=False,")],
              "compress.md": [(re.compile(r"\bn=\d+"), "n=8"),
                              (re.compile(r"\brecover_epochs=\d+"), "recover_epochs=1")]}


def _tiny(code: str, page: str = "") -> str:
    for pattern, repl in _TINY + _PAGE_TINY.get(page, []):
        code = pattern.sub(repl, code)
    return code


# What a guide's snippet takes from the reader: a small trained-looking teacher and student of each input kind.
_PRELUDE = """
import torch
from torch import nn
import exml_fast
from exml_fast.models import build_model
torch.manual_seed(0)
teacher = build_model("lenet5_bn", num_classes=10).eval()      # 1 x 32 x 32 inputs
student = build_model("lenet5_half", num_classes=10)
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
model = net
CIFAR_MEAN, CIFAR_STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
x = torch.randn(4, 3, 8, 8)
n = 8
"""

# What one guide's fragments take from the text around them.
_PAGE_PRELUDE = {
    "ops.md": """
import torch.nn.functional as F
x = torch.randn(4, 1, 32, 32)
x2 = x.clone()
y = torch.randint(0, 10, (4,))
iterations, first_bn_multiplier, r_bn = 2, 10.0, 1.0
jitter, ce, priors = (lambda t: t), F.cross_entropy, (lambda t: t.square().mean())
running_mean, running_var = torch.zeros(1), torch.ones(1)
logits, student_logits, teacher_logits = torch.randn(3, 4, 10).unbind(0)
target_probs = torch.softmax(torch.randn(4, 10), 1)
expert, prev_model = build_model("lenet5_bn", num_classes=10), build_model("lenet5_bn", num_classes=10)
new_classes, old_classes = torch.tensor([2, 3]), torch.tensor([0, 1])
labels = torch.randint(0, 10, (4,))
conv = nn.Conv2d(1, 4, 3, padding=1)
""",
    "distributed.md": """
synth = exml_fast.DeepInversion(teacher, input_shape=(1, 32, 32), iterations=2)
""",
}

_SKIP_PAGES_WITHOUT_DATA = {"README.md", "exml.md", "cil.md", "avalanche.md"}
# Pages whose code needs an optional extra: page -> (module, what installs it).
_PAGES_NEEDING = {"avalanche.md": ("avalanche", "pip install exml_fast[avalanche]"),
                  "compress.md": ("torchao", "pip install exml_fast[compress]")}


def _cases():
    for page in doc_pages():
        blocks = python_blocks(page)
        if blocks:
            yield pytest.param(page, blocks, id=page.name)


@pytest.mark.parametrize(("page", "blocks"), list(_cases()))
def test_code_blocks_run(page, blocks, tmp_path, monkeypatch):
    """Every ```python block of the page runs (the guides' at tiny sizes), in order, in one namespace."""
    if page.name in _SKIP_PAGES_WITHOUT_DATA and find_data_root("mnist") is None:
        pytest.skip("MNIST files not found (set EXML_FAST_DATA)")
    if page.name in _PAGES_NEEDING and importlib.util.find_spec(_PAGES_NEEDING[page.name][0]) is None:
        pytest.skip(f"{page.name} needs {_PAGES_NEEDING[page.name][0]}: {_PAGES_NEEDING[page.name][1]}")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny sizes gain nothing from threads, and lose much on a shared machine
    try:
        _run_page(page, blocks)
    finally:
        torch.set_num_threads(threads)


def _run_page(page, blocks):
    ns: dict = {"__name__": f"docs_{page.stem}"}
    if page != README:
        exec(compile(_PRELUDE + _PAGE_PRELUDE.get(page.name, ""), "<prelude>", "exec"), ns)  # noqa: S102
    ran = 0
    for line, code, skipped in blocks:
        if skipped:
            continue
        src = code if page == README else _tiny(code, page.name)
        try:
            exec(compile(src, f"{page.name}:{line}", "exec"), ns)  # noqa: S102
        except Exception as e:  # the page and line say which block
            raise AssertionError(f"{page.relative_to(ROOT)}, the block at line {line} failed: {e!r}\n{src}") from e
        ran += 1
    assert ran, f"{page.name}: every block is marked skip"


def test_few_blocks_are_skipped():
    """Blocks that do not run are the exception: at most one in ten, and none in the README."""
    blocks = [(p, b) for p in doc_pages() for b in python_blocks(p)]
    skipped = [(p.name, b[0]) for p, b in blocks if b[2]]
    assert not [s for s in skipped if s[0] == "README.md"]
    assert len(skipped) * 10 <= len(blocks), skipped


# --- the README --------------------------------------------------------------------------------------------------

def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_headlines_are_the_records():
    """The README's headline table is, row for row, what the records say (at most ten rows)."""
    records = _records()
    want = [[what, fig, records.headline_links(rel, from_docs=False)] for what, fig, rel in records.headline_rows(ROOT)]
    text = README.read_text()
    table = text[text.index("## Headline figures"):text.index("## Documentation")]
    got = [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in table.splitlines()
           if r.startswith("|")][2:]
    assert got == want
    assert len(got) <= 10


def _local_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not re.match(r"[a-z]+:", t)]


def test_readme_links_exist():
    missing = [t for t in _local_links(README) if not (ROOT / t).exists()]
    assert not missing


def test_guide_links_exist():
    """Links between guides and to record pages: a guide's target exists, or is a page the build generates."""
    records = {str(p.relative_to(ROOT / "benches" / "results").with_suffix(".md"))
               for p in (ROOT / "benches" / "results").rglob("*.json")} | {"index.md"}
    bad = []
    for page in DOCS.glob("*.md"):
        for t in _local_links(page):
            if t.startswith("records/"):
                ok = t[len("records/"):] in records
            else:
                ok = (page.parent / t).exists()
            if not ok:
                bad.append((page.name, t))
    assert not bad


def test_readme_make_targets_exist():
    """Every `make X` the README names is a Makefile target."""
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README.read_text()))
    named |= set(re.findall(r"^make ([a-z][\w-]*)", README.read_text(), flags=re.M))
    assert named and named <= targets, named - targets


# --- the generated tables ----------------------------------------------------------------------------------------

def test_generated_tables_come_from_the_records(tmp_path):
    """Every table a guide includes is generated, and carries the record's own figures."""
    records = _records()
    records.generate(ROOT, tmp_path)
    included = {m for p in DOCS.glob("*.md") for m in re.findall(r"\{include\} _generated/(\w+)\.md", p.read_text())}
    made = {p.stem for p in (tmp_path / "_generated").glob("*.md")}
    assert included and included <= made, included - made
    cil = json.loads((ROOT / "benches/results/cil_mnist.json").read_text())
    table = (tmp_path / "_generated" / "cil_mnist.md").read_text()
    for row in cil["rows"]:
        assert f"{row['final']['mean']:.2f} ± {row['final']['std']:.2f}" in table
    pages = list((tmp_path / "records").rglob("*.md"))
    assert len(pages) > 40 and (tmp_path / "records" / "index.md").exists()
    # a public-recipe record's controls are per method, and each table row of them is there (issue 42)
    public = json.loads((ROOT / "benches/results/dfkd_mnist_public_dfad.json").read_text())
    table = (tmp_path / "_generated" / "dfkd_mnist_public_dfad.md").read_text()
    for row in public["rows"]:
        c = row["control"]
        line = next(x for x in table.splitlines() if x.startswith("| control of") and f"{c['n']} real images" in x)
        assert line.endswith(f"| {c['student']['validation']:.2f} / {c['student']['test']:.2f} |")


def test_op_benchmark_tables_have_one_row_per_case():
    """benchlib's timing columns (inner, timer, the ratios' range) are measures, not parts of a case: a record
    with them gets one row per case and direction, every variant's time on it."""
    records = _records()
    rec = json.loads((ROOT / "benches/results/upsample_conv_cpu_bf16.json").read_text())
    assert {"inner", "timer", "speedup_min"} <= set(rec["op_level"][0])
    rows = [x for x in records.op_bench(rec["op_level"]).splitlines()[2:]]  # below the header
    assert len(rows) == len({(r["case"], r["direction"]) for r in rec["op_level"]}) == 8
    assert all("—" not in x and "timer" not in x for x in rows)


# --- the version -------------------------------------------------------------------------------------------------

def test_one_version():
    """pyproject.toml, exml_fast.__version__ and the changelog's latest entry agree."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    latest = re.search(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M).group(1)
    assert version == exml_fast.__version__ == latest


def test_docs_extra_lists_the_builders():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    names = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in extra}
    assert {"sphinx", "myst-parser", "furo"} <= names

