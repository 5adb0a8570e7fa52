"""The JSON path of POST /predict under garbage: every body is a 4xx RequestError (never
an exception the app would answer with 500).  In-process (no Ray); the live app gets a
sample of the same bodies in tests/test_serve.py."""
import json
import random

import numpy as np

from raymia.serving.http import InputSpec, RequestError, parse_predict

SPEC = InputSpec(1, 32, 32, 20, 5)


def garbage_bodies(n: int, seed: int = 0) -> list[bytes]:
    """Random and structured garbage for the JSON path: bytes, truncated and mutated
    valid bodies, deep nesting, huge numbers, NaN/Infinity, wrong types everywhere."""
    rng = random.Random(seed)
    ok = {"image": np.full((32, 32), 0.5).tolist()}
    ok_txt = json.dumps(ok)
    atoms = ["0", "-0", "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "9" * 5000, "-" + "9" * 5000,
             "1" * 4299, "1" * 31, "0." + "1" * 5000, "1e-999", "true", "false", "null", '"x"', '""', '"\\ud800"',
             "[]", "{}", "[[]]", "1.5", "2", "-1", "0.5", '"' + "A" * 100 + '"', "18446744073709551616"]
    structured = [
        b"9" * 5000, b"[" + b"9" * 5000 + b"]", b'{"image": ' + b"9" * 5000 + b"}",
        b'{"image": [[' + b"9" * 5000 + b"]]}", b'{"image": [[0.5], [' + b"1" * 4400 + b"]]}",
        b'{"top_k": ' + b"9" * 5000 + b', "image": []}', b'{"image": NaN}', b'{"image": [[NaN]]}',
        b'{"image": Infinity}', b"NaN", b"Infinity", b"[" * 100000 + b"]" * 100000,
        b'{"image":' * 50000 + b"0" + b"}" * 50000, b'{"image": ' + b"[" * 40 + b"0.5" + b"]" * 40 + b"}",
        b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"image": [[0.5]]' + b"}" * 10,
        b'{"image": "' + b"A" * 4000 + b'"}', b'{"image": "\\u0000"}', b'{"image": "\\ud800"}',
        b'{"image": [[0.5]], "image": 3}', b'{"\\ud800": 1}', b'{"image": {"a": 1}}',
        b'{"image": [["0.5"]]}', b'{"image": [[{"a": 1}]]}', b'{"image": [[[]]]}', b'{"image": 0.5}',
        b'{"image": true}', b'{"image": null}', b'{"labels_only": "maybe", "image": []}',
        b'{"top_k": 1.5, "image": []}', b'{"top_k": [], "image": []}', b'{"top_k": NaN, "image": []}',
        b"\xef\xbb\xbf{}", b"{\x00}", b"\xff" * 10, b"{" + b" " * 1000, b"[1,2,3]", b'"string"', b"{}",
        b'{"image": [' + b",".join([b"[0.5]" * 1] * 2000) + b"]}",
        json.dumps({"image": np.full((1, 32, 32), 0.5).tolist(), "top_k": 10 ** 25}).encode(),
        json.dumps({"image": (np.full((32, 32), 0.5) * 10 ** 20).tolist()}).encode(),
        json.dumps({"image": [[10 ** 25] * 32] * 32}).encode(),
        json.dumps({"image": [[2 ** 63] * 32] * 32}).encode(),
        json.dumps({"image": [[-(2 ** 63) - 1] * 32] * 32}).encode(),
        json.dumps({"image": [[0.5] * 32] * 31 + [[0.5] * 32 + [[0.5]]]}).encode(),
        json.dumps({"image": [[[0.5] * 32] * 32] * 1}).replace("0.5", "NaN", 3).encode(),
    ]
    out = list(structured)
    while len(out) < n:
        kind = rng.randrange(6)
        if kind == 0:                   # random bytes, sometimes starting like JSON
            out.append(rng.choice([b"{", b"[", b""]) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif kind == 1:                 # a truncated valid body
            out.append(ok_txt[:rng.randrange(1, len(ok_txt))].encode())
        elif kind == 2:                 # a valid body with one atom replaced
            parts = ok_txt.split("0.5")
            i = rng.randrange(1, len(parts))
            out.append(("0.5".join(parts[:i]) + rng.choice(atoms) + "0.5".join([""] + parts[i:])[0:]).encode())
        elif kind == 3:                 # random JSON documents of atoms
            def doc(depth):
                r = rng.random()
                if depth > 6 or r < 0.4:
                    return rng.choice(atoms)
                if r < 0.7:
                    return "[" + ",".join(doc(depth + 1) for _ in range(rng.randrange(4))) + "]"
                keys = ["image", "top_k", "labels_only", "x", ""]
                return "{" + ",".join(f'"{rng.choice(keys)}":{doc(depth + 1)}' for _ in range(rng.randrange(4))) + "}"
            out.append(doc(0).encode())
        elif kind == 4:                 # byte flips in a valid body
            b = bytearray(ok_txt.encode())
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            out.append(bytes(b))
        else:                           # right keys, wrong types / shapes
            img = rng.choice(atoms + ["[" * k + "0.5" + "]" * k for k in range(1, 40)])
            extra = rng.choice(["", ',"top_k":' + rng.choice(atoms), ',"labels_only":' + rng.choice(atoms)])
            out.append(f'{{"image":{img}{extra}}}'.encode())
    return out[:max(n, len(structured))]


def classify(body: bytes) -> int:
    """The status the app would answer (a RequestError's; 500 for any other exception;
    200 for an accepted image)."""
    try:
        parse_predict("application/json", body, SPEC)
        return 200
    except RequestError as e:
        return e.status
    except Exception:               # what the app turns into a 500
        return 500


def test_json_garbage_never_answers_5xx():
    bodies = garbage_bodies(3000)
    statuses = [classify(b) for b in bodies]
    fivexx = [(b[:80], s) for b, s in zip(bodies, statuses) if s >= 500]
    assert not fivexx, fivexx[:5]
    assert sum(400 <= s < 500 for s in statuses) >= 0.95 * len(bodies)


def test_big_integer_literal_is_a_4xx():
    for body in (b'{"image": ' + b"9" * 5000 + b"}", b'{"image": [[' + b"1" * 5000 + b"]]}", b"9" * 5000,
                 b'{"top_k": ' + b"9" * 5000 + b', "image": [[0.5]]}'):
        assert 400 <= classify(body) < 500
