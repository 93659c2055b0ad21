#!/usr/bin/env python3
"""Finds import cycles between the modules (files) of each crate in the workspace.

Every `.rs` file is a module node. File A depends on file B when A's code names a path that
resolves into B: `use crate::x::y`, `use super::z`, `crate::x::f()`, `super::f()`, or a path
through one of A's own child modules. What is *not* an edge: a parent's `mod child;`
declaration and its `pub use child::Item` re-exports (they are the parent's interface, not a
use of the child), and `#[cfg(test)]` modules (tests may reach anywhere).

A cycle is a strongly connected component of two or more files. Exits 1 and lists them when
there is any, so `make lint` fails on a new cycle.

    scripts/module-cycles.py [CRATE_SRC_DIR ...]   (default: every crate in the workspace)
"""

import os
import re
import sys

CRATES = [
    "common/src",
    "vmm-api/src",
    "proto/src",
    "vmm/src",
    "guest-agent/src",
    "runtime/src",
    "tests/src",
    "tests/guest-probe/src",
]

PATH_RE = re.compile(r"\b((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_RE = re.compile(r"^\s*(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.S | re.M)
MOD_DECL_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;", re.M)
CFG_TEST_MOD_RE = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+[A-Za-z_][A-Za-z0-9_]*\s*\{")


def strip_comments_and_strings(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def strip_test_modules(text):
    out, i = [], 0
    for m in CFG_TEST_MOD_RE.finditer(text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 0, m.end() - 1
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        i = j + 1
    out.append(text[i:])
    return "".join(out)


def module_files(src):
    """Maps a module path (tuple of names) to its file, for every file of the crate."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            full = os.path.join(root, f)
            rel = os.path.relpath(full, src)[:-3].split(os.sep)
            if rel[-1] in ("lib", "main") and len(rel) == 1:
                rel = []
            elif rel[-1] == "mod":
                rel = rel[:-1]
            elif rel[0] == "bin":
                continue  # binaries are crates of their own
            mods[tuple(rel)] = full
    return mods


def expand_use(tree):
    """`a::{b, c::{d}}` -> ['a::b', 'a::c::d']."""
    tree = re.sub(r"\s+", "", tree)
    tree = re.sub(r"\bas[A-Za-z_][A-Za-z0-9_]*", "", tree)
    if "{" not in tree:
        return [tree]
    i = tree.index("{")
    prefix, inner = tree[:i], tree[i + 1 : tree.rindex("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        if p:
            out.extend(prefix + q for q in expand_use(p))
    return out


def resolve(path, here, mods):
    """The module (tuple) a path names, from the module `here`; None outside the crate."""
    segs = path.split("::")
    if segs[0] == "crate":
        cur, segs = (), segs[1:]
    elif segs[0] in ("super", "self"):
        cur = here
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                cur = cur[:-1]
            segs = segs[1:]
    else:
        cur = here
        if (here + (segs[0],)) not in mods:
            return None
    best = cur if cur in mods else None
    for s in segs:
        cur = cur + (s,)
        if cur in mods:
            best = cur
        else:
            break
    return best


def edges_of(mod, file, mods):
    text = strip_test_modules(strip_comments_and_strings(open(file, encoding="utf-8").read()))
    children = set(MOD_DECL_RE.findall(text))
    deps = set()
    for m in USE_RE.finditer(text):
        is_pub = bool(m.group(1))
        for p in expand_use(m.group(2)):
            target = resolve(p, mod, mods)
            if target is None:
                continue
            # A parent's re-export of its own descendant is its interface, not a use.
            if is_pub and target[: len(mod) + 1][:-1] == mod and len(target) > len(mod):
                continue
            deps.add(target)
    body = USE_RE.sub("", text)
    for m in PATH_RE.finditer(body):
        target = resolve(m.group(1), mod, mods)
        if target is not None:
            deps.add(target)
    # Paths through a child module written without `self::` (`child::f()`).
    for child in children:
        if re.search(r"(?<![A-Za-z0-9_:])" + re.escape(child) + r"::", body):
            deps.add(mod + (child,))
    deps.discard(mod)
    return deps


def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    crates = sys.argv[1:] or [os.path.join(root, c) for c in CRATES]
    found = 0
    checked = 0
    for src in crates:
        if not os.path.isdir(src):
            continue
        mods = module_files(src)
        graph = {m: edges_of(m, f, mods) for m, f in mods.items()}
        checked += len(mods)
        for comp in sccs(graph):
            if len(comp) < 2:
                continue
            found += 1
            names = sorted(os.path.relpath(mods[m], root) for m in comp)
            print(f"cycle in {os.path.relpath(src, root)}: {len(names)} files")
            for n in names:
                print(f"  {n}")
            for m in sorted(comp):
                inner = sorted(os.path.relpath(mods[t], root) for t in graph[m] if t in comp)
                print(f"    {os.path.relpath(mods[m], root)} -> {', '.join(inner)}")
    if found:
        print(f"{found} import cycle(s) among {checked} modules")
        return 1
    print(f"no import cycles among {checked} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
