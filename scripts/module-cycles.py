#!/usr/bin/env python3
"""Finds import circles between the source files of each workspace crate, and between
crates.

Files: an edge A -> B when non-test code in A names an item defined in B (through a
`use` or a path in the code: `crate::`, `super::`, `self::`, a child module's name),
following `pub use` re-exports to the file that defines the item. Only `mod`
declarations are not edges. With --cross, edges between a file and its ancestor or
descendant modules' files are left out (containment), which is what "a circle between
modules" means in the usual sense; without it every edge counts (strict).

Crates: the dependency graph from `cargo metadata` (normal and build dependencies; a
dev-dependency back edge, allowed by cargo, is reported too).

Usage (from the workspace root): scripts/module-cycles.py [--cross] [crate-dir ...]
(default: every member)
Exits 1 if a circle is found.
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.getcwd()


def strip_comments_and_strings(src):
    # Line and block comments, string and char literals: replaced by spaces.
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"' or (c == "r" and re.match(r'r#*"', src[i:i + 10] or "")):
            m = re.match(r'r(#*)"', src[i:])
            if m:
                end = '"' + m.group(1)
                j = src.find(end, i + len(m.group(0)))
                j = n if j < 0 else j + len(end)
            else:
                j = i + 1
                while j < n and src[j] != '"':
                    j += 2 if src[j] == "\\" else 1
                j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", src[i:i + 4] or ""):
            m = re.match(r"'(\\.|[^\\'])'", src[i:])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_test_modules(src):
    """Drops `#[cfg(test)] mod x { ... }` blocks (test code is not the crate's shape)."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", src)
        if not m:
            return src
        depth, j = 1, m.end()
        while j < len(src) and depth:
            if src[j] == "{":
                depth += 1
            elif src[j] == "}":
                depth -= 1
            j += 1
        src = src[:m.start()] + re.sub(r"[^\n]", " ", src[m.start():j]) + src[j:]


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"] (aliases dropped)."""
    tree = re.sub(r"\s+", "", tree)
    depth = 0
    for i, c in enumerate(tree):
        if c == "{":
            if depth == 0:
                prefix, body = tree[:i], tree[i + 1:-1]
                parts, d, cur = [], 0, ""
                for ch in body:
                    if ch == "," and d == 0:
                        parts.append(cur)
                        cur = ""
                        continue
                    d += ch == "{"
                    d -= ch == "}"
                    cur += ch
                parts.append(cur)
                out = []
                for p in parts:
                    if not p:
                        continue
                    if p == "self":
                        out.append(prefix.rstrip(":"))
                    else:
                        out.extend(expand_use(prefix + p))
                return out
            depth += 1
        elif c == "}":
            depth -= 1
    return [re.sub(r"as\w+$", "", tree.split(" as ")[0]) if "as" not in tree else tree.split("as")[0]]


class Crate:
    def __init__(self, name, src_root):
        self.name = name
        self.dir = os.path.dirname(src_root)
        self.files = {}  # module path tuple -> file
        self.children = {}  # module -> set(child names)
        self.reexports = {}  # module -> {name: path (tuple, relative to crate root)}
        self.uses = {}  # module -> list of path tuples (absolute, crate-relative)
        self.declared = {}  # module -> set(item names defined in the file)
        self.load(("crate",), src_root)

    def load(self, mod, path):
        try:
            raw = open(path).read()
        except OSError:
            return
        src = strip_test_modules(strip_comments_and_strings(raw))
        self.files[mod] = path
        kids = set()
        for m in re.finditer(r"^\s*(pub(\([^)]*\))?\s+)?mod\s+(\w+)\s*;", src, re.M):
            kids.add(m.group(3))
        self.children[mod] = kids
        base = os.path.dirname(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem not in ("mod", "lib", "main"):
            base = os.path.join(base, stem)
        # #[path = "..."] overrides are not followed (none in these crates' libraries).
        for k in kids:
            for cand in (os.path.join(base, k + ".rs"), os.path.join(base, k, "mod.rs")):
                if os.path.exists(cand):
                    self.load(mod + (k,), cand)
                    break
        self.declared[mod] = set(
            re.findall(r"\b(?:fn|struct|enum|trait|type|const|static|union|macro_rules!)\s+(\w+)", src)
        )
        re_map, uses = {}, []
        for m in re.finditer(r"^\s*(pub(\([^)]*\))?\s+)?use\s+([^;]+);", src, re.M):
            is_pub = m.group(1) is not None and "pub" in m.group(1) and "(" not in (m.group(1) or "")
            for p in expand_use(m.group(3)):
                segs = tuple(s for s in p.split("::") if s)
                if not segs:
                    continue
                absp = self.absolute(mod, segs)
                if absp is None:
                    continue
                if is_pub and segs[-1] != "*":
                    re_map[segs[-1]] = absp
                uses.append(absp)
        body = re.sub(r"^\s*(pub(\([^)]*\))?\s+)?use\s+[^;]+;", "", src, flags=re.M)
        for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", body):
            absp = self.absolute(mod, tuple(m.group(1).split("::")))
            if absp:
                uses.append(absp)
        for m in re.finditer(r"(?<![:\w])(\w+)::\w+", body):
            if m.group(1) in kids:
                uses.append(mod + tuple(m.group(0).split("::")))
        self.reexports[mod] = re_map
        self.uses[mod] = uses

    def absolute(self, mod, segs):
        """A path as seen from `mod`, made absolute (crate-rooted); None if external."""
        if segs[0] == "crate":
            return ("crate",) + segs[1:]
        cur = mod
        i = 0
        while i < len(segs) and segs[i] in ("super", "self"):
            if segs[i] == "super":
                cur = cur[:-1]
            i += 1
        if i > 0:
            return cur + segs[i:]
        # Edition 2018+: a bare first segment is a child module (or an external crate).
        if segs[0] in self.children.get(mod, set()):
            return mod + segs
        return None

    def resolve(self, path, depth=0):
        """The module (file) that defines the item `path` names."""
        cur = ("crate",)
        for i, s in enumerate(path[1:], start=1):
            if s in self.children.get(cur, set()) and cur + (s,) in self.files:
                cur = cur + (s,)
                continue
            if s == "*":
                return cur
            tgt = self.reexports.get(cur, {}).get(s)
            if tgt is not None and depth < 20 and tgt != path[: i + 1]:
                rest = path[i + 1:]
                return self.resolve(tgt + rest, depth + 1)
            return cur
        return cur

    def edges(self, cross):
        out = {}
        for mod, uses in self.uses.items():
            for p in uses:
                t = self.resolve(p)
                if t is None or t == mod or t not in self.files:
                    continue
                if cross and (t[: len(mod)] == mod or mod[: len(t)] == t):
                    continue
                out.setdefault(mod, set()).add(t)
        return out


def cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, on, stack, comps, n = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
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
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return comps


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    cross = "--cross" in sys.argv
    meta = json.loads(
        subprocess.check_output(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT
        )
    )
    found = False
    crate_graph = {}
    names = {p["name"] for p in meta["packages"]}
    for p in meta["packages"]:
        crate_graph[p["name"]] = {
            d["name"] for d in p["dependencies"] if d["name"] in names and d.get("kind") != "dev"
        }
        for t in p["targets"]:
            if "lib" not in t["kind"]:
                continue
            d = os.path.dirname(p["manifest_path"])
            if args and not any(os.path.abspath(a) == d for a in args):
                continue
            c = Crate(p["name"], t["src_path"])
            comps = cycles(c.edges(cross))
            rel = lambda m: os.path.relpath(c.files[m], ROOT)
            if comps:
                found = True
                for comp in comps:
                    print(f"{p['name']}: circle: " + " <-> ".join(sorted(rel(m) for m in comp)))
            else:
                print(f"{p['name']}: {len(c.files)} files, no circle")
    comps = cycles(crate_graph)
    for comp in comps:
        found = True
        print("crates: circle: " + " <-> ".join(sorted(comp)))
    if not comps:
        print(f"crates: {len(crate_graph)} packages, no circle")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
