"""Static checks of the source that no runtime test is sure to reach (pyflakes / ruff are not in
the environment, so the check pyflakes calls F823 is written here on the standard ``ast``).

A function that imports a name *after* using it, ``def f(): print(sys.argv); ...; import sys``,
makes ``sys`` local to the whole function: the earlier use raises UnboundLocalError ("cannot access
local variable 'sys'") although the module imports ``sys`` at its top. Last session shipped exactly
that (``sas_app/commands/distill.py``, a local ``import sys`` in an ``if`` below a use), caught only
because the README walkthrough test happened to run that branch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sas_core", "sas_app", "sas_ros")

_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
_COMPS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_EXITS = (ast.Return, ast.Raise, ast.Break, ast.Continue)


class _Expr:
    """Names one expression (or the head of a statement) reads and binds, in evaluation order.

    Comprehensions count as part of it (they run at once, and a name they do not bind themselves
    is the enclosing function's); lambda bodies do not (they run later)."""

    def __init__(self):
        self.events: list = []   # ("load" | "bind", name, node)

    def visit(self, node, hidden=frozenset()) -> "_Expr":
        if node is None:
            return self
        if isinstance(node, ast.Name):
            if node.id not in hidden:
                self.events.append(("load" if isinstance(node.ctx, ast.Load) else "bind", node.id, node))
        elif isinstance(node, ast.NamedExpr):
            self.visit(node.value, hidden)
            self.visit(node.target, frozenset())   # a walrus binds in the function, even in a comprehension
        elif isinstance(node, ast.Lambda):
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                self.visit(d, hidden)
        elif isinstance(node, _COMPS):
            own = set()
            for gen in node.generators:
                own |= {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
            inner = hidden | own
            for i, gen in enumerate(node.generators):  # the first iterable is evaluated outside
                self.visit(gen.iter, hidden if i == 0 else inner)
                for cond in gen.ifs:
                    self.visit(cond, inner)
            for part in ((node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)):
                self.visit(part, inner)
        else:
            for child in ast.iter_child_nodes(node):
                self.visit(child, hidden)
        return self


class _Flow:
    """Definite-binding analysis of one function (the compiler's view of its locals, with the
    control flow read structurally): for each read of a name that the function imports itself,
    whether every path to the read has bound the name first. A read on a path where it has not
    raises UnboundLocalError (the import makes the name local to the whole function, so the
    module-level name of the same spelling is never seen)."""

    def __init__(self, func):
        self.watch = set()
        self.declared = set()
        for node in _own_nodes(func):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.watch |= {_import_name(a) for a in node.names} - {"*"}
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                self.declared.update(node.names)
        self.watch -= self.declared
        self.problems: list = []     # (line, name, why)
        args = func.args
        bound = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]
                 if a is not None}
        if self.watch:
            self.block(func.body, bound)

    def expr(self, node, bound: set, hidden=frozenset()) -> None:
        for kind, name, n in _Expr().visit(node, hidden).events:
            if kind == "bind":
                bound.add(name)
            elif name in self.watch and name not in bound:
                self.problems.append((n.lineno, name))

    def block(self, stmts, bound: set):
        """The names surely bound after ``stmts`` (None: the block never falls through)."""
        bound = set(bound)
        for stmt in stmts:
            bound = self.stmt(stmt, bound)
            if bound is None:
                return None
        return bound

    @staticmethod
    def _meet(*states):
        live = [s for s in states if s is not None]
        return set.intersection(*live) if live else None

    def stmt(self, s, bound: set):
        e = self.expr
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            return bound | {_import_name(a) for a in s.names}
        if isinstance(s, _FUNCS + (ast.ClassDef,)):
            for d in s.decorator_list:
                e(d, bound)
            if isinstance(s, ast.ClassDef):
                for b in s.bases + [k.value for k in s.keywords]:
                    e(b, bound)
            else:
                for d in s.args.defaults + [d for d in s.args.kw_defaults if d is not None]:
                    e(d, bound)
            return bound | {s.name}
        if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            if isinstance(s, ast.AugAssign):   # x += 1 reads x first
                e(ast.Name(id=s.target.id, ctx=ast.Load(), lineno=s.lineno) if isinstance(s.target, ast.Name)
                  else s.target, bound)
            e(s.value, bound)
            for t in (s.targets if isinstance(s, ast.Assign) else [s.target]):
                e(t, bound)
            return bound
        if isinstance(s, ast.If):
            e(s.test, bound)
            return self._meet(self.block(s.body, bound), self.block(s.orelse, bound))
        if isinstance(s, (ast.For, ast.AsyncFor)):
            e(s.iter, bound)
            inner = set(bound)
            e(s.target, inner)
            self.block(s.body, inner)          # may run no time: its bindings do not count after
            return self.block(s.orelse, bound) if s.orelse else bound
        if isinstance(s, ast.While):
            e(s.test, bound)
            self.block(s.body, bound)
            return self.block(s.orelse, bound) if s.orelse else bound
        if isinstance(s, (ast.With, ast.AsyncWith)):
            for item in s.items:
                e(item.context_expr, bound)
                e(item.optional_vars, bound)
            return self.block(s.body, bound)
        if isinstance(s, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            after = self.block(s.body, bound)
            if after is not None and s.orelse:
                after = self.block(s.orelse, after)
            outs = [after]
            for h in s.handlers:               # a handler may run after any part of the body
                hb = set(bound)
                e(h.type, hb)
                if h.name:
                    hb.add(h.name)
                outs.append(self.block(h.body, hb))
            out = self._meet(*outs)
            if s.finalbody:
                fin = self.block(s.finalbody, bound)
                if fin is None:
                    return None
                out = None if out is None else out | fin
            return out
        if isinstance(s, ast.Match):
            e(s.subject, bound)
            outs = []
            for case in s.cases:
                cb = set(bound)
                cb |= {n.name for n in ast.walk(case.pattern) if isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name}
                e(case.guard, cb)
                outs.append(self.block(case.body, cb))
            last = s.cases[-1] if s.cases else None
            if last is None or last.guard is not None or not (isinstance(last.pattern, ast.MatchAs)
                                                              and last.pattern.pattern is None):
                outs.append(bound)             # no case may match (no irrefutable last case)
            return self._meet(*outs)
        if isinstance(s, (ast.Global, ast.Nonlocal)):
            return bound
        e(s, bound)                            # expression statements, return, raise, assert, del, ...
        if isinstance(s, ast.Delete):
            bound = bound - {t.id for t in s.targets if isinstance(t, ast.Name)}
        return None if isinstance(s, _EXITS) else bound


def _import_name(alias) -> str:
    return alias.asname or alias.name.split(".")[0]


def _own_nodes(func):
    """Every node of ``func``'s own scope (not inside nested functions, lambdas or classes)."""
    todo = list(func.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, _FUNCS + (ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def used_before_local_import(source: str, filename: str = "<source>") -> list:
    """``"file:line: ..."`` for every read of a name, in a function, on a path where that
    function's own import of the name has not run yet (pyflakes' F823 and the possibly-unbound
    case it misses: the import in one ``if`` branch, the read after it or in another branch).
    The import makes the name local to the whole function, so the read raises UnboundLocalError
    even where the module imports the same name at its top."""
    tree = ast.parse(source, filename=filename)
    found = []
    for func in ast.walk(tree):
        if isinstance(func, _FUNCS):
            for line, name in sorted(set(_Flow(func).problems)):
                found.append(f"{filename}:{line}: {name!r} read in {func.name}() where its own import of "
                             f"{name!r} may not have run (UnboundLocalError)")
    return found


#: Reads the analysis cannot prove safe but that are, ``"path:function:name": why``. The analysis
#: reads control flow structurally (not the values of conditions): a read guarded by the same
#: condition as its import is flagged. Each entry must still be flagged (a stale one fails).
ALLOWED = {
    "sas_app/commands/fuse.py:_run_dataset:has_masks": "imported under `if args.save_masks`; its one read "
    "is behind `args.save_masks and ...` (short-circuit)",
}


def scan(root: Path = ROOT, packages=PACKAGES) -> tuple:
    """(files scanned, findings) over every ``*.py`` under ``root/<package>``."""
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    bad = [b for p in files for b in used_before_local_import(p.read_text(), str(p.relative_to(root)))]
    return len(files), bad


def test_no_function_uses_a_name_before_importing_it_locally():
    n, bad = scan()
    assert n > 50  # the scan sees the packages
    key = lambda b: "{}:{}:{}".format(b.split(":")[0], b.split(" read in ")[1].split("()")[0], b.split("'")[1])  # noqa: E731
    assert [b for b in bad if key(b) not in ALLOWED] == []
    assert sorted(ALLOWED) == sorted({key(b) for b in bad})  # no stale allowance


# ---- the checker itself, on planted examples
# the shape of last session's distill.py bug: the local import in one branch, a read in another
LAST_SESSIONS_BUG = '''
import sys


def run(args):
    missing = [a for a in args.items if a]
    if missing and args.rank == 0:
        import sys

        print(len(missing), file=sys.stderr)
    if not args.val:
        print("training without validation", file=sys.stderr)
    return 0
'''


def test_the_check_flags_last_sessions_bug_and_python_agrees():
    bad = used_before_local_import(LAST_SESSIONS_BUG, "distill.py")
    assert len(bad) == 1 and bad[0].startswith("distill.py:12: 'sys' read in run()"), bad
    ns: dict = {}
    exec(compile(LAST_SESSIONS_BUG, "distill.py", "exec"), ns)
    args = type("A", (), {"items": [], "rank": 0, "val": ""})()
    with pytest.raises(UnboundLocalError, match="sys"):
        ns["run"](args)
    args.items = [1]
    assert ns["run"](args) == 0   # the branch that imports runs first: fine, which is why it slipped


@pytest.mark.parametrize("body", [
    "def f():\n    x = sys.argv\n    import sys\n",
    "def f():\n    x = [sys for _ in range(2)]\n    from os import sys\n",          # read by a comprehension
    "def f():\n    sys = sys.modules\n    import sys\n",                          # the value is read first
    "def f():\n    with open(np.__file__) as np:\n        pass\n    import numpy as np\n",
    "async def f():\n    await g(np)\n    import numpy as np\n",
    "class C:\n    def m(self):\n        return Path(self)\n    def n(self):\n        from pathlib import Path\n"
    "        return Path\n    def o(self):\n        y = Path\n        from pathlib import Path\n",
    "def f():\n    for p in Path('.').iterdir():\n        pass\n    from pathlib import Path\n",
    "def f(a):\n    if a:\n        import sys\n    return sys.argv\n",                 # one branch only
    "def f(a):\n    for x in a:\n        import sys\n    return sys.argv\n",             # a loop may not run
    "def f():\n    try:\n        import numpy as np\n    except ImportError:\n        pass\n    return np\n",
    "def f(a):\n    while a:\n        a = sys.argv\n        import sys\n",              # first pass reads it
    "def f():\n    import sys\n    del sys\n    return sys.argv\n",
    "def f():\n    @functools.cache\n    def g():\n        pass\n    import functools\n",   # the decorator runs in f
])
def test_the_check_flags_each_form(body):
    assert len(used_before_local_import(body)) == 1, body


@pytest.mark.parametrize("body", [
    "def f():\n    import sys\n    return sys.argv\n",
    "def f(sys):\n    x = sys.argv\n    import sys\n",                            # a parameter binds first
    "def f():\n    def g():\n        return sys.argv\n    import sys\n    return g\n",  # g runs later
    "def f():\n    g = lambda: np.zeros(1)\n    import numpy as np\n    return g\n",
    "def f():\n    global sys\n    x = sys.argv\n    import sys\n",               # not a local
    "def f():\n    x = [np for np in range(3)]\n    import numpy as np\n",        # the comprehension's own np
    "def f():\n    try:\n        import numpy as np\n    except ImportError:\n        np = None\n    return np\n",
    "def f():\n    np = None\n    x = np\n    import numpy as np\n",            # bound before the use
    "def f(a):\n    if a:\n        import sys\n    else:\n        sys = None\n    return sys\n",
    "def f(a):\n    if not a:\n        return 0\n    import sys\n    return sys.argv\n",
    "def f(a):\n    if a:\n        import sys\n        return sys.argv\n    raise ValueError\n",
    "def f():\n    try:\n        import numpy as np\n    except ImportError:\n        raise SystemExit(1)\n    return np\n",
    "def f():\n    with ctx():\n        import sys\n    return sys.argv\n",
    "def f(v):\n    match v:\n        case 1:\n            import sys\n        case _:\n            import sys\n    return sys\n",
    "import sys\n\ndef f():\n    return sys.argv\n",
])
def test_the_check_accepts_correct_code(body):
    assert used_before_local_import(body) == [], body


def test_the_scan_fails_on_a_planted_file(tmp_path):
    """The package scan itself (not only the function): a planted module under a scanned package
    makes it fail, and names the file and line."""
    pkg = tmp_path / "sas_app" / "commands"
    pkg.mkdir(parents=True)
    (pkg / "ok.py").write_text("import sys\n\ndef f():\n    return sys.argv\n")
    assert scan(tmp_path, ("sas_app",)) == (1, [])
    (pkg / "planted.py").write_text(LAST_SESSIONS_BUG)
    n, bad = scan(tmp_path, ("sas_app",))
    assert n == 2 and len(bad) == 1 and bad[0].startswith("sas_app/commands/planted.py:12: 'sys'")
