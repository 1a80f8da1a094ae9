"""NSP pairs: layout of [CLS] A [SEP] B [SEP], padding, and ~50 % random next segments."""

import numpy as np

from mlm_dist.data.nsp import IS_NEXT, IS_RANDOM, NspPairBuilder
from mlm_dist.tokenizer import CLS_ID, PAD_ID, SEP_ID


def make_documents(n_docs=300, seed=0):
    """Documents whose tokens encode (document, sentence, position) so pairs can be traced."""
    rng = np.random.default_rng(seed)
    docs = []
    next_id = 10
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(1, 12))):
            n = int(rng.integers(3, 30))
            doc.append(np.arange(next_id, next_id + n))
            next_id += n
        docs.append(doc)
    return docs


def segments(ex):
    ids = ex.input_ids
    n = int(ex.attention_mask.sum())
    seps = np.flatnonzero(ids[:n] == SEP_ID)
    return ids[1:seps[0]], ids[seps[0] + 1:seps[1]], n, seps


def test_layout_and_balance():
    seq_len = 64
    examples = list(NspPairBuilder(seq_len, np.random.default_rng(1))(make_documents()))
    assert len(examples) > 500
    labels = np.array([e.nsp_label for e in examples])
    assert 0.42 < labels.mean() < 0.58, labels.mean()
    for e in examples:
        assert e.input_ids.shape == e.token_type_ids.shape == e.attention_mask.shape == (seq_len,)
        a, b, n, seps = segments(e)
        assert e.input_ids[0] == CLS_ID and len(seps) == 2 and seps[1] == n - 1
        assert len(a) > 0 and len(b) > 0
        assert (e.input_ids[n:] == PAD_ID).all() and (e.attention_mask[:n] == 1).all()
        assert (e.attention_mask[n:] == 0).all()
        assert (e.token_type_ids[:seps[0] + 1] == 0).all()
        assert (e.token_type_ids[seps[0] + 1:n] == 1).all() and (e.token_type_ids[n:] == 0).all()
        if e.nsp_label == IS_NEXT:
            # Token ids were assigned consecutively, so an actual-next B continues A's text
            # (truncation trims only the outer ends).
            assert b[0] > a[-1] and b[0] - a[-1] < 60


def test_random_next_comes_from_another_document():
    docs = make_documents(n_docs=100)
    owner = {}
    for d, doc in enumerate(docs):
        for s in doc:
            for t in s:
                owner[int(t)] = d
    for e in NspPairBuilder(48, np.random.default_rng(2))(docs):
        a, b, _, _ = segments(e)
        if e.nsp_label == IS_RANDOM:
            assert owner[int(a[0])] != owner[int(b[0])]
        else:
            assert owner[int(a[0])] == owner[int(b[-1])]


def test_long_sentences_are_truncated_and_same_seed_same_pairs():
    docs = [[np.arange(10, 500), np.arange(500, 900)], [np.arange(900, 1300)]] * 5
    a = list(NspPairBuilder(32, np.random.default_rng(3))(docs))
    b = list(NspPairBuilder(32, np.random.default_rng(3))(docs))
    assert all(int(e.attention_mask.sum()) <= 32 for e in a)
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
