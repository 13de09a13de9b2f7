import gc, collections, types

def edge_label(src, dst):
    if isinstance(src, dict):
        for k, v in src.items():
            if v is dst:
                return f"[{k!r}]"[:40]
        return "[key]"
    if isinstance(src, (list, tuple, set, frozenset, collections.deque)):
        return "[i]"
    if isinstance(src, types.FrameType):
        for k, v in src.f_locals.items():
            if v is dst:
                return f".f_locals[{k}]"
        if src.f_back is dst: return ".f_back"
        return ".frame?"
    d = getattr(src, "__dict__", None)
    if isinstance(d, dict):
        if d is dst: return ".__dict__"
        for k, v in d.items():
            if v is dst: return "." + k
    for k in dir(type(src)):
        if k.startswith("__") and k not in ("__self__", "__func__", "__traceback__", "__context__", "__cause__", "__closure__"):
            continue
        try:
            if getattr(src, k) is dst: return "." + k
        except Exception:
            pass
    return "->"

def find_cycle(start, pool_ids):
    prev = {id(start): None}
    queue = collections.deque([start])
    objs = {id(start): start}
    while queue:
        cur = queue.popleft()
        for ref in gc.get_referents(cur):
            if ref is start:
                path = [ref, cur]
                k = id(cur)
                while prev[k] is not None:
                    k = prev[k]
                    path.append(objs[k])
                path.reverse()
                return path
            if id(ref) in pool_ids and id(ref) not in prev:
                prev[id(ref)] = id(cur)
                objs[id(ref)] = ref
                queue.append(ref)
    return None

def describe(path):
    out = []
    for a, b in zip(path, path[1:]):
        name = type(a).__qualname__
        if isinstance(a, types.FrameType):
            name += f"({a.f_code.co_name})"
        if isinstance(a, types.FunctionType) or type(a).__name__ in ("method","coroutine"):
            name += f"({getattr(a, '__qualname__', '')})"
        out.append(name + edge_label(a, b))
    return " -> ".join(out)

def report(garbage, names, limit=2):
    pool = {id(o) for o in garbage}
    seen = set()
    for o in garbage:
        t = type(o).__qualname__
        if t in names and seen.__len__() < 200:
            if sum(1 for s in seen if s[0] == t) >= limit:
                continue
            c = find_cycle(o, pool)
            if c:
                d = describe(c)
                if (t, d) not in seen:
                    seen.add((t, d))
                    print(f"CYCLE {t}: {d}")
