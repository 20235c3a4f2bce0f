"""How far counting goes on a corpus: a character n-gram model with interpolated Kneser-Ney smoothing
(Chen and Goodman 1998; one discount per order, n1 / (n1 + 2 n2)), counted on a prepared folder's
train split and scored on its val split in bits per character as train.py scores a model: each
document's <|endoftext|> one character more, predicted once per document. A reference the speedrun's
models can be read against; it says nothing of what a network could reach, only what counts give.

    python -m logs.ngram_bound --data_dir=data/zh_large --orders=1,2,3,4,5 --train_share=1.0
"""
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
from configurator import parse_args
from opengpt.cli import UserError, run
from opengpt.data import TokenData

BOUNDARY = 0  # the <|endoftext|> between documents, as a character of its own


def characters(data, split):
    """(codes, sources): the split's text as Unicode code points, BOUNDARY (0) for each <|endoftext|>, and
    the source of each (its span's, as meta.json records the spans in tokens)."""
    tokenizer = data.load_tokenizer()
    table = tokenizer.token_bytes
    table[tokenizer.eot_token] = b"\x00"
    tokens = np.asarray(data.tokens[split]).tolist()
    texts, sources = [], []
    for span in data.sources[split] or [dict(source="all", start=0, end=len(tokens))]:
        texts.append(b"".join(table[t] for t in tokens[span["start"]:span["end"]]).decode("utf-8"))
        sources += [span["source"]] * len(texts[-1])
    return np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32), np.array(sources)


def sample_documents(codes, share, seed=0):
    """A share of the documents, drawn at random (the train split is ordered by source)."""
    if share >= 1:
        return codes
    starts = np.flatnonzero(codes == BOUNDARY)
    pieces = np.split(codes, starts[1:])
    keep = np.random.default_rng(seed).random(len(pieces)) < share
    return np.concatenate([p for p, k in zip(pieces, keep) if k])


def gram_ids(stream, order, lower_ids):
    """(keys, ids): the sorted keys of the n-grams of stream, and per position t >= order - 1 the id (rank of
    its key) of the n-gram ending at t; a key is its (n-1)-gram's id (lower_ids, ending at t - 1) and char t."""
    keys = (lower_ids[:-1].astype(np.int64) << 20) | stream[order - 1:].astype(np.int64)
    return np.unique(keys, return_inverse=True)


def kneser_ney_bits(train, val, n_symbols, top):
    """Bits of each prediction of val[1:] (int arrays of character ids below n_symbols - 1; n_symbols - 1
    is reserved for a character train lacks) under interpolated Kneser-Ney of order `top` counted on train:
    P_n(w | h) = max(c_n(hw) - D_n, 0) / c_n(h.) + D_n N_n(h.) / c_n(h.) P_(n-1)(w | h'), with c the raw
    count at the top order and the number of distinct left neighbours below it; a context never seen
    falls to the order below; the unigram's base is uniform over n_symbols."""
    known = n_symbols - 1
    ids, keys = {1: train.astype(np.int64)}, {1: np.arange(known, dtype=np.int64)}
    for n in range(2, top + 1):
        keys[n], ids[n] = gram_ids(train, n, ids[n - 1])
    # val's n-grams in train's ids (-1: not in train); val_grams[n][j] is the n-gram ending at j + n - 1
    val_grams = {1: np.where(val < known, val, -1).astype(np.int64)}
    for n in range(2, top + 1):
        lower = val_grams[n - 1][:-1]
        key = (np.maximum(lower, 0) << 20) | val[n - 1:]
        where = np.minimum(np.searchsorted(keys[n], key), len(keys[n]) - 1)
        val_grams[n] = np.where((lower >= 0) & (val[n - 1:] < known) & (keys[n][where] == key), where, -1)
    prob = None
    for n in range(1, top + 1):
        if n == top:
            count = np.bincount(ids[n], minlength=len(keys[n])).astype(np.float64)
        else:  # each distinct (n+1)-gram adds one to the n-gram it ends with
            first = np.unique(ids[n + 1], return_index=True)[1]
            count = np.bincount(ids[n][first + 1], minlength=len(keys[n])).astype(np.float64)
        n1, n2 = np.sum(count == 1), np.sum(count == 2)
        discount = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
        # the prediction of val position p is index p - 1: the n-gram ending at p, its context ending at p - 1
        ending = np.full(len(val) - 1, -1, dtype=np.int64)
        ending[max(n - 2, 0):] = val_grams[n][1:] if n == 1 else val_grams[n]
        gram_count = np.where(ending >= 0, count[np.maximum(ending, 0)], 0)
        if n == 1:
            total, types = count.sum(), np.sum(count > 0)
            prob = np.maximum(gram_count - discount, 0) / total + discount * types / total / n_symbols
            continue
        context_of = keys[n] >> 20
        context_total = np.bincount(context_of, weights=count, minlength=len(keys[n - 1]))
        context_types = np.bincount(context_of, weights=count > 0, minlength=len(keys[n - 1]))
        contexts = np.full(len(val) - 1, -1, dtype=np.int64)
        contexts[n - 2:] = val_grams[n - 1][:len(val) - n + 1]
        total = np.where(contexts >= 0, context_total[np.maximum(contexts, 0)], 0)
        types = np.where(contexts >= 0, context_types[np.maximum(contexts, 0)], 0)
        safe = np.maximum(total, 1)
        prob = np.where(total > 0, np.maximum(gram_count - discount, 0) / safe + discount * types / safe * prob, prob)
    return -np.log2(prob)


def main():
    cfg = parse_args(dict(data_dir="data/zh_large", orders="1,2,3,4,5", train_share=1.0), sys.argv[1:])
    orders = str(cfg["orders"]).split(",")
    if not all(order.strip().isdigit() and int(order) >= 1 for order in orders):
        raise UserError(f"--orders={cfg['orders']}: give n-gram orders of 1 or more, comma-separated, e.g. --orders=1,2,3")
    started = time.time()
    data = TokenData(cfg["data_dir"], 8)
    train = sample_documents(characters(data, "train")[0], cfg["train_share"])
    val, val_sources = characters(data, "val")
    alphabet = np.unique(train)
    assert len(alphabet) < 2 ** 20
    # a character's id: its rank in train's alphabet; one train lacks gets len(alphabet)
    train_ids = np.searchsorted(alphabet, train)
    where = np.minimum(np.searchsorted(alphabet, val), len(alphabet) - 1)
    val_ids = np.where(alphabet[where] == val, where, len(alphabet))
    print(f"{cfg['data_dir']}: train {len(train):,} characters ({cfg['train_share']:.0%} of its documents), "
          f"val {len(val):,} ({int(np.sum(val == BOUNDARY)):,} document boundaries), alphabet {len(alphabet):,}, "
          f"{int(np.sum(val_ids == len(alphabet))):,} val characters not in train; read in {time.time() - started:.0f} s",
          flush=True)
    results = {}
    for top in map(int, orders):
        bits = kneser_ney_bits(train_ids, val_ids, len(alphabet) + 1, top)
        by_source = {name: round(float(bits[val_sources[1:] == name].mean()), 3) for name in dict.fromkeys(val_sources)}
        results[top] = dict(all=round(float(bits.mean()), 3), **by_source)
        print(f"order {top}: val {bits.mean():.3f} bits/char over {len(bits):,} predictions ({time.time() - started:.0f} s); "
              f"by source: " + ", ".join(f"{name} {value:.3f}" for name, value in by_source.items()), flush=True)
    print(json.dumps(dict(data_dir=cfg["data_dir"], train_share=cfg["train_share"], bits_per_char=results)))


if __name__ == "__main__":
    run(main)
