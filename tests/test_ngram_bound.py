"""logs/ngram_bound.py: its vectorised Kneser-Ney gives, prediction by prediction, the bits of a plain
implementation written from the formula, and every distribution it mixes sums to one."""
import collections
import math

import numpy as np
import pytest

from logs.ngram_bound import kneser_ney_bits


def reference_probability(train, n_symbols, top):
    """P(w | h) of interpolated Kneser-Ney, from counted tuples: raw counts at the top order, distinct left
    neighbours below it, D = n1 / (n1 + 2 n2) per order, a context never seen falls to the order below."""
    grams = {n: collections.Counter(tuple(train[t - n + 1:t + 1]) for t in range(n - 1, len(train))) for n in range(1, top + 1)}
    counts = {}
    for n in range(1, top + 1):
        if n == top:
            counts[n] = dict(grams[n])
        else:
            counts[n] = {g: len({bigger[0] for bigger in grams[n + 1] if bigger[1:] == g}) for g in grams[n]}
    discounts = {}
    for n, c in counts.items():
        n1, n2 = sum(v == 1 for v in c.values()), sum(v == 2 for v in c.values())
        discounts[n] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5

    def probability(w, h):
        n, d = len(h) + 1, discounts[len(h) + 1]
        c = counts[n]
        if n == 1:
            total, types = sum(c.values()), sum(v > 0 for v in c.values())
            return max(c.get((w,), 0) - d, 0) / total + d * types / total / n_symbols
        lower = probability(w, h[1:])
        following = [v for g, v in c.items() if g[:-1] == h]
        if sum(following) == 0:
            return lower
        return max(c.get(h + (w,), 0) - d, 0) / sum(following) + d * sum(v > 0 for v in following) / sum(following) * lower
    return probability


@pytest.mark.parametrize("top", [1, 2, 3, 4])
def test_the_vectorised_bits_are_the_formulas(top):
    rng = np.random.default_rng(top)
    n_symbols = 7  # ids 0-5 in train, 6 for a character train lacks
    train = np.concatenate([np.arange(6), rng.choice(6, 400, p=[0.1, 0.4, 0.2, 0.15, 0.1, 0.05])])
    val = np.concatenate([rng.choice(6, 80), [6, 1, 2, 6, 6, 3]])
    probability = reference_probability(train.tolist(), n_symbols, top)
    expected = [-math.log2(probability(int(val[p]), tuple(int(x) for x in val[max(0, p - top + 1):p])))
                for p in range(1, len(val))]
    np.testing.assert_allclose(kneser_ney_bits(train, val, n_symbols, top), expected, rtol=1e-12)
    # the reference is a distribution after every context, seen or not
    for h in [(), (1,), (2, 1), (6, 1, 2), (5, 5, 5)]:
        h = h[len(h) - min(len(h), top - 1):] if top > 1 else ()
        assert math.isclose(sum(probability(w, h) for w in range(n_symbols)), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("orders", ["abc", "0", "1,,2", "-1"])
def test_orders_that_are_not_counts_are_one_line_before_the_data_is_read(orders, tmp_path):
    from conftest import assert_user_error, run_script
    result = run_script("logs/ngram_bound.py", f"--orders={orders}", f"--data_dir={tmp_path / 'missing'}")
    assert_user_error(result, f"--orders={orders}: give n-gram orders of 1 or more")
