"""Lines per module and the longest functions of a Python tree (for architecture reviews).

    python tools/code_stats.py [mmscale] [--top 10] [--json out.json] [--imports]

--imports adds the number of import statements inside functions (each function's body walked whole,
so an import in a nested function counts for it and for its parent), per module and in total.

Lines are physical lines of each file; a function's length is end_lineno - lineno + 1 of its `def`
(nested functions counted on their own, and inside their parent).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


def imports_in_functions(tree: ast.AST) -> int:
    """Import statements inside function bodies (ast.walk of each def: nested defs count again)."""
    return sum(isinstance(s, (ast.Import, ast.ImportFrom)) for f in ast.walk(tree)
               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for s in ast.walk(f))


def stats(root: Path) -> dict:
    modules, functions, imports = {}, [], {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        rel = str(path.relative_to(root.parent))
        modules[rel] = text.count("\n")
        tree = ast.parse(text)
        imports[rel] = imports_in_functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
    functions.sort(reverse=True)
    return {"modules": modules, "total": sum(modules.values()), "longest": functions,
            "imports_in_functions": imports, "imports_in_functions_total": sum(imports.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="mmscale")
    ap.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--imports", action="store_true", help="also count import statements inside functions")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a directory; pass the package folder, e.g. mmscale", file=sys.stderr)
        return 2
    s = stats(root)
    for rel, n in s["modules"].items():
        print(f"{n:6d}  {rel}")
    print(f"{s['total']:6d}  total ({len(s['modules'])} modules)")
    print("longest functions:")
    for n, where in s["longest"][:args.top]:
        print(f"{n:6d}  {where}")
    if args.imports:
        print("imports inside functions:")
        for rel, n in sorted(s["imports_in_functions"].items(), key=lambda kv: -kv[1]):
            if n:
                print(f"{n:6d}  {rel}")
        print(f"{s['imports_in_functions_total']:6d}  total")
    if args.json:
        Path(args.json).write_text(json.dumps({**s, "longest": s["longest"][:args.top]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
