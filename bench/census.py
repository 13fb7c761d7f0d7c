"""Code census of the packages: lines, the largest functions, `isinstance` dispatches on the correction kind, and
imports of our own modules inside functions. Prints a table (and JSON with --json), so a refactor's before and after
are one command each: `python bench/census.py`.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("steering", "server", "training", "clients", "reasonmaxxer")
KINDS = {"HeadAdapter", "LoraAdapter", "Teacher"}


def _ours(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
    return any(a.name.split(".")[0] in PACKAGES for a in node.names)


def census() -> dict:
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    lines = functions = 0
    largest, dispatches, local_imports = [], [], []
    for path in files:
        text = path.read_text()
        lines += text.count("\n")
        tree = ast.parse(text)
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions += 1
                largest.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and _ours(inner):
                        local_imports.append(f"{rel}:{inner.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                    and len(node.args) == 2):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & KINDS:
                    dispatches.append(f"{rel}:{node.lineno}")
    largest.sort(reverse=True)
    return {"files": len(files), "lines": lines, "functions": functions,
            "largest_functions": [f"{n} lines {where}" for n, where in largest[:10]],
            "kind_isinstance": len(dispatches), "kind_isinstance_files": sorted({d.split(":")[0] for d in dispatches}),
            "function_level_imports_of_ours": len(local_imports)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write the census here")
    args = ap.parse_args()
    c = census()
    for key, value in c.items():
        if isinstance(value, list):
            print(f"{key}:")
            for v in value:
                print(f"  {v}")
        else:
            print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(c, indent=1) + "\n")


if __name__ == "__main__":
    main()
