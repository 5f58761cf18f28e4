import os
import subprocess
import sys

import numpy as np
import pytest

from models.runtime.hashing import hash_bucket, hash_buckets, ins_id, stable_hash64


def test_stable_hash_is_process_independent():
    """Python's hash() is salted per process; ours must not be."""
    code = ("from models.runtime.hashing import stable_hash64, hash_bucket, ins_id;"
            "print(stable_hash64('a', 1, 2.0), hash_bucket('user_id', '196', 65536),"
            " ins_id('196:881250949', '242', 881250949000))")
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=env, check=True, cwd=os.getcwd()).stdout.strip())
    assert len(outs) == 1
    a, b, c = (int(x) for x in outs.pop().split())
    assert a == stable_hash64("a", 1, 2.0) and b == hash_bucket("user_id", "196", 65536)
    assert c == ins_id("196:881250949", "242", 881250949000)


def test_hash_properties():
    h = stable_hash64("x")
    assert 0 <= h < 2 ** 64
    assert stable_hash64("a", "bc") != stable_hash64("ab", "c")  # parts are separated
    assert stable_hash64(3) == stable_hash64(3.0) == stable_hash64("3")
    assert hash_bucket("user_id", "1", 1000) != hash_bucket("item_id", "1", 1000) or \
        hash_bucket("user_id", "2", 1000) != hash_bucket("item_id", "2", 1000)
    assert ins_id("r", "i", 1) != ins_id("r", "i", 2)
    with pytest.raises(ValueError, match="n_buckets"):
        hash_bucket("f", "v", 0)


def test_vectorised_buckets_match_scalar():
    values = np.array(["a", "b", "a", "17", ""], dtype=object)
    got = hash_buckets("field", values, 97)
    assert got.tolist() == [hash_bucket("field", v, 97) for v in values]
    assert ((got >= 0) & (got < 97)).all()
