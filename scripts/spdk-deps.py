#!/usr/bin/env python3
"""Prints the dependency graph between the modules of src/spdk (a folder counts as one
module) from their `use`/path references, and fails if it has a cycle.

Usage: python3 scripts/spdk-deps.py [src/spdk]
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "src", "spdk")
mods = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        top = parts[0][:-3] if len(parts) == 1 else parts[0]
        if top == "mod":
            top = "(root)"
        # In a folder's files other than mod.rs, `super::` is the folder itself.
        nested = len(parts) > 1 and parts[-1] != "mod.rs"
        mods.setdefault(top, set())
        text = open(path).read()
        # Drop comments and test modules (their `use super::*` is not a dependency).
        text = re.sub(r"//[^\n]*", "", text)
        text = re.split(r"#\[cfg\(test\)\]", text)[0]
        names = set(re.findall(r"crate::spdk::(\w+)", text))
        if nested:
            names |= set(re.findall(r"super::super::(\w+)", text))
        else:
            names |= set(re.findall(r"super::(\w+)", text))
            for group in re.findall(r"use super::\{([^}]*)\}", text):
                names |= {g.strip().split("::")[0] for g in group.split(",") if g.strip()}
        if top == "(root)":
            names |= set(re.findall(r"\b(\w+)::", text))
        mods[top] |= names
known = set(mods) - {"(root)"}
graph = {m: sorted((d & known) - {m}) for m, d in mods.items()}
for m in sorted(graph):
    print(f"{m:14} -> {', '.join(graph[m]) or '-'}")
# cycle check (DFS)
state = {}
def visit(m, stack):
    state[m] = 1
    for d in graph.get(m, []):
        if state.get(d) == 1:
            print("CYCLE:", " -> ".join(stack + [m, d]))
            return False
        if state.get(d) is None and not visit(d, stack + [m]):
            return False
    state[m] = 2
    return True
ok = all(visit(m, []) for m in sorted(graph) if state.get(m) is None)
print("no cycles" if ok else "cycle found")
sys.exit(0 if ok else 1)
