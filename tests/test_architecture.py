"""The dependency rules of docs/architecture.md ("Which part may use which"), checked on the source.

A small AST walk over byollm/ collects every import: `import x`, `from x import y` (relative ones resolved), at
module level, inside functions and under `if TYPE_CHECKING:` alike, plus the optional dependencies loaded by name
(`require("transformers", ...)`, `importlib.import_module("x")`). The rules:

- `byollm.model` and `byollm.tokenizer` import nothing of byollm but `byollm.errors` (and themselves);
- no import cycles between byollm modules (an import inside a function counts too);
- no module imports a private name (`from byollm.a import _b`) of another byollm module, nor reads `a._b`;
- only `byollm/interop/*` and `byollm/cli.py` (and the short allow-list below, each with its reason) import the
  heavy interop libraries; only `byollm/serve/*` imports the web-server libraries; only `byollm/rag/*` the
  retrieval libraries (FAISS, sentence-transformers, bm25s, PyStemmer, pypdf, selectolax);
- nothing imports `byollm.cli`;
- no file in byollm/ is longer than MAX_LINES lines.

Each test names the offending file, line and import. The last tests run the checker on a small synthetic
package, so a broken checker (one that finds nothing) cannot pass unnoticed.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "byollm"

# Only these import the heavy libraries: interop (conversions) and the CLI (which calls it).
INTEROP_LIBRARIES = ("transformers", "peft", "gguf", "llama_cpp", "trl", "bitsandbytes", "lm_eval")
INTEROP_ALLOWED = ("byollm.interop", "byollm.cli")
# Only serve/ runs a web server.
SERVE_LIBRARIES = ("fastapi", "uvicorn", "starlette", "prometheus_client")
SERVE_ALLOWED = ("byollm.serve",)
# Only rag/ runs retrieval (embeddings, vector and lexical indexes, document parsers).
RAG_LIBRARIES = ("faiss", "sentence_transformers", "bm25s", "Stemmer", "pypdf", "selectolax")
RAG_ALLOWED = ("byollm.rag",)
# (module, library): why this module may use that library although it is not interop.
LIBRARY_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("byollm.finetune.nf4", "bitsandbytes"):
        "quantize_model(backend='bitsandbytes'): bitsandbytes' Linear4bit as a training backend of QLoRA "
        "(`byollm finetune --lora.quant_backend bitsandbytes`), loaded lazily through errors.require",
}
# Layers at the bottom: they may import only these parts of byollm (and themselves).
BASE_LAYERS = ("byollm.model", "byollm.tokenizer")
BASE_MAY_IMPORT = ("byollm.errors",)
NOT_IMPORTABLE = ("byollm.cli",)
MAX_LINES = 600


# --------------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "byollm.checkpoint"
    file: str  # its file, relative to the root, e.g. "byollm/checkpoint.py"
    line: int
    target: str  # the module imported: the most specific package module it names, else as written
    names: tuple[str, ...] = ()  # from-import names that are not modules
    function: str | None = None  # the enclosing function, None at module level
    statement: str = ""  # the import as written

    def where(self) -> str:
        scope = f" (in {self.function})" if self.function else ""
        return f"{self.file}:{self.line}{scope}: {self.statement}"


@dataclass(frozen=True)
class PrivateUse:
    file: str
    line: int
    what: str  # e.g. "byollm.generate._TextTracker"
    how: str  # the source text

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.how} uses {self.what}, a private name of another module"


@dataclass
class Scan:
    modules: dict[str, Path] = field(default_factory=dict)  # module name -> file
    imports: list[Import] = field(default_factory=list)
    private: list[PrivateUse] = field(default_factory=list)

    def __repr__(self) -> str:  # pytest prints the fixture of a failing test: keep it short
        return f"Scan({len(self.modules)} modules, {len(self.imports)} imports)"

    def internal(self) -> list[Import]:
        return [i for i in self.imports if i.target in self.modules]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
    """"a.b.c" for the expression a.b.c (Names and Attributes only), else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


class _Visitor(ast.NodeVisitor):
    def __init__(self, scan: Scan, package: str, module: str, file: str, is_package: bool, source: str) -> None:
        self.scan, self.package, self.module, self.file, self.source = scan, package, module, file, source
        # The package relative imports start from: the module itself for an __init__, else its parent.
        self.base = module if is_package else module.rpartition(".")[0]
        self.scopes: list[str] = []  # enclosing classes and functions
        self.aliases: dict[str, str] = {}  # local name -> the package module it is bound to
        self.attributes: list[ast.Attribute] = []

    def _specific(self, name: str) -> str:
        """The longest prefix of the dotted `name` that is a module of the package (else `name`)."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.scan.modules:
                return ".".join(parts[:n])
        return name

    def _add(self, node: ast.AST, target: str, names: tuple[str, ...] = ()) -> None:
        self.scan.imports.append(Import(
            self.module, self.file, node.lineno, target, names, ".".join(self.scopes) or None,
            (ast.get_source_segment(self.source, node) or "").split("\n")[0].strip()))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scopes.append(node.name)
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, self._specific(alias.name))
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:  # `import a.b.c` binds `a`
                self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.base.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, node.module] if node.module else base)
        else:
            source = node.module or ""
        plain: list[str] = []
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if sub in self.scan.modules:  # `from byollm import generate`: the module byollm.generate
                self._add(node, sub)
                self.aliases[alias.asname or alias.name] = sub
            else:
                plain.append(alias.name)
            if _is_private(alias.name) and source.split(".")[0] == self.package and source != self.module:
                self.scan.private.append(PrivateUse(self.file, node.lineno, f"{source}.{alias.name}",
                                                    f"`from {source} import {alias.name}`"))
        if plain:
            self._add(node, self._specific(source), tuple(plain))

    def visit_Call(self, node: ast.Call) -> None:
        # Optional dependencies loaded by name: require("transformers", "hf"), importlib.import_module("x").
        func = _dotted(node.func) or ""
        if func.split(".")[-1] in ("require", "import_module") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(node, self._specific(arg.value))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attributes.append(node)
        self.generic_visit(node)

    def finish(self) -> None:
        """`mod._x` where `mod` is a package module bound by an import (checked once all aliases are known)."""
        for node in self.attributes:
            if not _is_private(node.attr) or (owner := _dotted(node.value)) is None:
                continue
            head, _, rest = owner.partition(".")
            if head not in self.aliases:
                continue
            target = ".".join(filter(None, [self.aliases[head], rest]))
            if target in self.scan.modules and target != self.module:
                self.scan.private.append(PrivateUse(self.file, node.lineno, f"{target}.{node.attr}",
                                                    f"`{owner}.{node.attr}`"))


def scan(root: Path, package: str = PACKAGE) -> Scan:
    """Every import and private-name use in the package `root / package`."""
    result = Scan()
    files = sorted((root / package).rglob("*.py"))
    for f in files:
        result.modules[module_name(f, root)] = f
    for f in files:
        source = f.read_text(encoding="utf-8")
        visitor = _Visitor(result, package, module_name(f, root), f.relative_to(root).as_posix(),
                           f.name == "__init__.py", source)
        visitor.visit(ast.parse(source, filename=str(f)))
        visitor.finish()
    return result


def _inside(module: str, parts: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in parts)


def layer_violations(s: Scan, layers: tuple[str, ...] = BASE_LAYERS,
                     may_import: tuple[str, ...] = BASE_MAY_IMPORT) -> list[str]:
    out = []
    for i in s.internal():
        own = next((layer for layer in layers if _inside(i.module, (layer,))), None)
        if own is not None and not _inside(i.target, (own, *may_import)):
            out.append(f"{i.where()} -- {own} may import only {', '.join((*may_import, own))} of its "
                       f"package, not {i.target}")
    return out


def find_cycles(s: Scan) -> list[list[Import]]:
    """Import cycles between package modules, each as the imports that close it (a -> b -> ... -> a).

    Per strongly connected component of the import graph, the shortest cycle through each of its modules
    (duplicates dropped), so every module caught in a cycle is named with a path."""
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for i in s.internal():
        if i.target != i.module:
            edges[i.module].setdefault(i.target, i)
    # Tarjan's strongly connected components (iterative).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(s.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    cycles: list[list[Import]] = []
    seen: set[frozenset[tuple[str, str]]] = set()
    for component in components:
        members = set(component)
        for start in component:
            # Breadth-first from start's successors back to start, inside the component.
            parent: dict[str, str] = {}
            queue = deque([start])
            found = False
            while queue and not found:
                node = queue.popleft()
                for child in sorted(edges[node]):
                    if child not in members or child in parent:
                        continue
                    parent[child] = node
                    if child == start:
                        found = True
                        break
                    queue.append(child)
            path = [start]
            while (prev := parent[path[-1]]) != start:
                path.append(prev)
            path.append(start)
            path.reverse()
            hops = [edges[a][b] for a, b in zip(path, path[1:], strict=False)]
            key = frozenset((h.module, h.target) for h in hops)
            if key not in seen:
                seen.add(key)
                cycles.append(hops)
    return cycles


def format_cycle(hops: list[Import]) -> str:
    chain = " -> ".join([hops[0].module, *(h.target for h in hops)])
    return chain + "".join(f"\n      {h.where()}" for h in hops)


def library_violations(s: Scan, libraries: tuple[str, ...], allowed: tuple[str, ...],
                       exceptions: dict[tuple[str, str], str] | None = None) -> list[str]:
    exceptions = exceptions or {}
    out = []
    for i in s.imports:
        library = i.target.split(".")[0]
        if library in libraries and not _inside(i.module, allowed) and (i.module, library) not in exceptions:
            out.append(f"{i.where()} -- only {', '.join(allowed)} may import {library}")
    return out


def forbidden_imports(s: Scan, forbidden: tuple[str, ...] = NOT_IMPORTABLE) -> list[str]:
    return [f"{i.where()} -- nothing imports {i.target}" for i in s.internal()
            if _inside(i.target, forbidden) and not _inside(i.module, forbidden)]


def long_files(s: Scan, root: Path, max_lines: int = MAX_LINES) -> list[str]:
    out = []
    for path in s.modules.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > max_lines:
            out.append(f"{path.relative_to(root).as_posix()}: {n} lines (at most {max_lines}; split it by topic)")
    return sorted(out)


def _report(rule: str, problems: list[str]) -> str:
    return f"{len(problems)} violation(s) of '{rule}' (docs/architecture.md):\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------------
# byollm itself
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byollm_scan() -> Scan:
    return scan(ROOT, PACKAGE)


def test_the_scan_sees_the_package(byollm_scan):
    # A guard for the checker itself: it must see the modules and their imports (else every rule passes).
    assert {"byollm.checkpoint", "byollm.model.model", "byollm.tokenizer.base", "byollm.cli"} <= set(
        byollm_scan.modules)
    edges = {(i.module, i.target) for i in byollm_scan.internal()}
    assert ("byollm.checkpoint", "byollm.model") in edges
    assert ("byollm.checkpoint", "byollm.interop.hf") in edges  # lazily, inside load_checkpoint
    assert any(i.target == "transformers" for i in byollm_scan.imports)  # through require("transformers", ...)


def test_model_and_tokenizer_import_only_errors(byollm_scan):
    problems = layer_violations(byollm_scan)
    assert not problems, _report("model and tokenizer depend on nothing else in byollm (only errors)", problems)


def test_no_import_cycles(byollm_scan):
    cycles = find_cycles(byollm_scan)
    assert not cycles, _report("no import cycles (function-level imports count)", [format_cycle(c) for c in cycles])


def test_no_private_names_of_other_modules(byollm_scan):
    problems = [p.where() for p in byollm_scan.private]
    assert not problems, _report("no module uses another module's private (_x) names", problems)


@pytest.mark.parametrize(("libraries", "allowed"), [(INTEROP_LIBRARIES, INTEROP_ALLOWED),
                                                    (SERVE_LIBRARIES, SERVE_ALLOWED), (RAG_LIBRARIES, RAG_ALLOWED)],
                         ids=["interop", "serve", "rag"])
def test_heavy_libraries_only_where_allowed(byollm_scan, libraries, allowed):
    problems = library_violations(byollm_scan, libraries, allowed, LIBRARY_EXCEPTIONS)
    assert not problems, _report(f"only {', '.join(allowed)} import {', '.join(libraries)}", problems)


def test_library_exceptions_are_still_needed(byollm_scan):
    used = {(i.module, i.target.split(".")[0]) for i in byollm_scan.imports}
    stale = [f"{module} no longer imports {library}: remove it from LIBRARY_EXCEPTIONS"
             for module, library in LIBRARY_EXCEPTIONS if (module, library) not in used]
    assert not stale, "\n".join(stale)


def test_nothing_imports_the_cli(byollm_scan):
    problems = forbidden_imports(byollm_scan)
    assert not problems, _report("nothing imports byollm.cli", problems)


def test_no_file_over_the_line_limit(byollm_scan):
    problems = long_files(byollm_scan, ROOT)
    assert not problems, _report(f"no file in byollm/ over {MAX_LINES} lines", problems)


# --------------------------------------------------------------------------------------------------
# The checker finds what it should: a tiny package with one of each problem
# --------------------------------------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


BAD_PACKAGE = {
    "__init__.py": "",
    "errors.py": "class Oops(Exception): ...\n",
    "cli.py": "import transformers\n",
    "a.py": "from pkg import b\n\n\ndef f():\n    return b.g()\n",
    "b.py": "def g():\n    from pkg.c import h  # a function-level import closes the cycle\n    return h()\n",
    "c.py": "from . import a\n\n\ndef h():\n    return a\n",
    "model/__init__.py": "",
    "model/net.py": "from pkg.errors import Oops\nfrom pkg.a import f\nfrom ..c import h\n",
    "user.py": ("import pkg.b as bee\nimport pkg.c\nfrom pkg import a\nfrom pkg.c import _secret, h\n"
                "from pkg.cli import main\nfrom pkg.errors import require\n\n\ndef go():\n    import fastapi\n"
                "    require('peft', 'x')\n    return a._private(), bee._other, h, pkg.c._deep, a.__name__, main\n"),
    "serve/__init__.py": "",
    "serve/app.py": "import fastapi.responses\nfrom starlette import status\n",
    "big.py": "x = 1\n" * 30,
}


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    s = scan(_package(tmp_path, BAD_PACKAGE), "pkg")
    cycles = find_cycles(s)
    assert len(cycles) == 1, [format_cycle(c) for c in cycles]
    text = format_cycle(cycles[0])
    assert text.startswith("pkg.a -> pkg.b -> pkg.c -> pkg.a"), text
    assert "pkg/b.py:2 (in g): from pkg.c import h" in text
    assert "pkg/c.py:1: from . import a" in text  # the relative import, resolved
    assert "1 violation(s) of 'no cycles'" in _report("no cycles", [text])


def test_checker_finds_private_names(tmp_path):
    s = scan(_package(tmp_path, BAD_PACKAGE), "pkg")
    assert sorted(p.what for p in s.private) == ["pkg.a._private", "pkg.b._other", "pkg.c._deep", "pkg.c._secret"]
    assert "pkg/user.py:4: `from pkg.c import _secret` uses pkg.c._secret" in [p.where() for p in s.private][0]


def test_checker_finds_layer_library_cli_and_length_violations(tmp_path):
    root = _package(tmp_path, BAD_PACKAGE)
    s = scan(root, "pkg")
    layers = layer_violations(s, ("pkg.model",), ("pkg.errors",))
    assert [p.split(" -- ")[0] for p in layers] == ["pkg/model/net.py:2: from pkg.a import f",
                                                    "pkg/model/net.py:3: from ..c import h"]
    interop = library_violations(s, ("transformers", "peft"), ("pkg.interop", "pkg.cli"))
    assert [p.split(" -- ")[0] for p in interop] == ["pkg/user.py:11 (in go): require('peft', 'x')"]
    serve = library_violations(s, ("fastapi", "starlette"), ("pkg.serve",))
    assert [p.split(" -- ")[0] for p in serve] == ["pkg/user.py:10 (in go): import fastapi"]
    assert not library_violations(s, ("peft",), ("pkg.interop",), {("pkg.user", "peft"): "a reason"})
    assert [p.split(" -- ")[0] for p in forbidden_imports(s, ("pkg.cli",))] == [
        "pkg/user.py:5: from pkg.cli import main"]
    assert long_files(s, root, max_lines=20) == ["pkg/big.py: 30 lines (at most 20; split it by topic)"]
