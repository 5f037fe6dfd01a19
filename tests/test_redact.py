"""Secret values cut out of a run's output, wherever the chunks split them."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudtask.agent.redact import Redactor


def stream(redactor: Redactor, data: bytes, cuts: list[int]) -> bytes:
    out, last = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        out.append(redactor.feed(data[last:cut]))
        last = cut
    out.append(redactor.feed(data[last:]))
    out.append(redactor.flush())
    return b"".join(out)


def test_values_are_masked_across_chunk_boundaries_and_short_ones_are_not_secret():
    r = Redactor(["hunter2", "hunter2-long", "ab"])
    data = b"pw=hunter2-long; again hunter2\nab stays\n"
    for n in range(1, len(data) + 1):  # every way to cut it in two
        assert stream(Redactor(["hunter2", "hunter2-long", "ab"]), data, [n]) == (
            b"pw=***; again ***\nab stays\n"
        )
    assert r.string("error: hunter2 refused") == "error: *** refused"
    assert Redactor([]).feed(b"as is") == b"as is"


@settings(max_examples=300, deadline=None)
@given(
    secret=st.text(alphabet="abc", min_size=3, max_size=8),
    other=st.text(alphabet="abc", min_size=3, max_size=8),
    filler=st.lists(st.sampled_from([b"a", b"b", b"c", b"\n", b"x"]), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    seed=st.integers(min_value=0, max_value=10**6),
)
def test_no_cut_ever_lets_a_value_through(secret, other, filler, cuts, seed):
    rng = random.Random(seed)
    parts = list(filler)
    for value in (secret, other):
        parts.insert(rng.randint(0, len(parts)), value.encode())
    data = b"".join(parts)
    out = stream(Redactor([secret, other]), data, cuts)
    assert secret.encode() not in out and other.encode() not in out
    assert out == Redactor([secret, other]).text(data)  # the same as redacting it whole
