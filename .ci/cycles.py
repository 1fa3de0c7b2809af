#!/usr/bin/env python3
"""Import cycles between the files of a Rust crate (`use crate::…` and `crate::…` paths).

Usage: python3 .ci/cycles.py src   — prints each cycle and exits 1 if there is one.
A parent module reaching into its own child files is not a cycle; test modules are ignored.
"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "src"
files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".rs"):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            files[tuple(parts)] = p
def resolve(path):
    # longest prefix that is a file
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in files:
            return tuple(path[:n])
    return None
def expand_use(text):
    out = []
    for m in re.finditer(r"\buse\s+crate::([^;]+);", text, re.S):
        out += expand("", m.group(1))
    for m in re.finditer(r"(?<![\w:])crate::((?:\w+::)*\w+)", text):
        out.append(m.group(1))
    return out
def expand(prefix, s):
    s = re.sub(r"\s+", "", s)
    i = s.find("{")
    if i < 0:
        return [prefix + s]
    head, body = s[:i], s[i+1:s.rfind("}")]
    parts, depth, cur = [], 0, ""
    for c in body:
        if c == "{": depth += 1
        if c == "}": depth -= 1
        if c == "," and depth == 0:
            parts.append(cur); cur = ""
        else:
            cur += c
    if cur: parts.append(cur)
    res = []
    for p in parts:
        res += expand(prefix + head, p)
    return res
graph = {k: set() for k in files}
for k, p in files.items():
    text = open(p).read()
    text = re.sub(r"//[^\n]*", "", text)
    # drop test modules
    text = re.split(r"#\[cfg\(test\)\]", text)[0]
    for u in expand_use(text):
        u = u.split(" as ")[0]
        segs = [s for s in u.split("::") if s and s != "self" and s != "*"]
        t = resolve(segs)
        if t and t != k and not (k[:len(t)] == t):  # parent module re-exports are fine only if not cycle
            graph[k].add(t)
# find cycles (SCCs)
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
for v in graph:
    if v not in index: strong(v)
for c in sccs:
    names = ["::".join(x) or "lib" for x in c]
    print("cycle:", ", ".join(sorted(names)))
    for a in c:
        for b in graph[a]:
            if b in c:
                print("   ", "::".join(a), "->", "::".join(b))
print(len(sccs), "cycles")
sys.exit(1 if sccs else 0)
