"""NSP pairs: layout of [CLS] A [SEP] B [SEP], padding, truncation and ~50 % random next."""

import numpy as np

from mlm_dist.data.nsp import IS_NEXT, IS_RANDOM, NspPairBuilder, truncate_pair
from mlm_dist.data.batches import BatchWriter
from mlm_dist.data.shards import WORD_START
from mlm_dist.bench.workload import synthetic_vocabulary
from mlm_dist.tokenizer import CLS_ID, PAD_ID, SEP_ID


def make_documents(n_docs=300, seed=0):
    """Documents whose tokens are consecutive integers, so pairs can be traced to their source."""
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


def test_packed_rows_have_bert_layout_and_labels_are_balanced():
    seq_len = 64
    pairs = list(NspPairBuilder(seq_len, np.random.default_rng(1))(make_documents()))
    assert len(pairs) > 500
    labels = np.array([p.label for p in pairs])
    # Half random, and more: as in BERT, a lone sentence at a document's end gets a random B.
    assert 0.5 < labels.mean() < 0.68, labels.mean()
    writer = BatchWriter(len(pairs), seq_len, synthetic_vocabulary(2000))
    for a, b, label, _ in pairs:
        writer.add(a, b, label)
    b = writer.take()
    ids, types, mask, nsp, starts = (t.numpy() for t in (
        b.input_ids, b.token_type_ids, b.attention_mask, b.example_label, b.word_starts))
    for row, (a, b, label, _) in enumerate(pairs):
        n = len(a) + len(b) + 3
        assert len(a) > 0 and len(b) > 0 and n <= seq_len
        assert ids[row, 0] == CLS_ID and ids[row, len(a) + 1] == SEP_ID and ids[row, n - 1] == SEP_ID
        assert (ids[row, 1:len(a) + 1] == a).all() and (ids[row, len(a) + 2:n - 1] == b).all()
        assert (ids[row, n:] == PAD_ID).all() and mask[row].sum() == n and mask[row, :n].all()
        assert (types[row, :len(a) + 2] == 0).all() and (types[row, len(a) + 2:n] == 1).all()
        assert (types[row, n:] == 0).all() and nsp[row] == label
        if label == IS_NEXT:
            # consecutive ids: an actual-next B continues A (truncation trims outer ends only)
            assert b[0] > a[-1] and b[0] - a[-1] < 60


def test_random_next_comes_from_another_document():
    docs = make_documents(n_docs=100)
    owner = {int(t): d for d, doc in enumerate(docs) for s in doc for t in s}
    for a, b, label, _ in NspPairBuilder(48, np.random.default_rng(2))(docs):
        if label == IS_RANDOM:
            assert owner[int(a[0])] != owner[int(b[0])]
        else:
            assert owner[int(a[0])] == owner[int(b[-1])]


def test_truncation_matches_berts_loop_in_lengths():
    rng = np.random.default_rng(0)
    for la, lb, limit in [(100, 5, 50), (30, 40, 50), (40, 40, 51), (10, 10, 50), (3, 300, 61)]:
        a, b = truncate_pair(np.arange(la), np.arange(1000, 1000 + lb), limit, rng)
        # reference: BERT's token-at-a-time loop, lengths only
        ra, rb = la, lb
        while ra + rb > limit:
            if ra > rb:
                ra -= 1
            else:
                rb -= 1
        assert (len(a), len(b)) == (ra, rb)
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()  # contiguous slices


def test_long_sentences_are_truncated_and_same_seed_same_pairs():
    docs = [[np.arange(10, 500), np.arange(500, 900)], [np.arange(900, 1300)]] * 5
    x = list(NspPairBuilder(32, np.random.default_rng(3))(docs))
    y = list(NspPairBuilder(32, np.random.default_rng(3))(docs))
    assert all(len(a) + len(b) + 3 <= 32 for a, b, _, _ in x)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(x, y))


def book_documents(n_docs=300, sentences=60, seed=0):
    """Long documents of short sentences, tokens numbered so pairs trace to their document."""
    rng = np.random.default_rng(seed)
    docs, next_id = [], 10
    for _ in range(n_docs):
        doc = []
        for _ in range(sentences):
            n = int(rng.integers(4, 12))
            doc.append(np.arange(next_id, next_id + n))
            next_id += n
        docs.append(doc)
    return docs


def test_interleaving_mixes_documents_in_every_micro_batch():
    docs = book_documents()
    pairs = list(NspPairBuilder(64, np.random.default_rng(4), open_documents=256)(docs))
    batches = [pairs[i:i + 32] for i in range(0, len(pairs) - 31, 32)]
    distinct = [len({p.document for p in batch}) for batch in batches]
    assert np.mean(distinct) >= 28, np.mean(distinct)
    # one document after the other: a micro-batch is a handful of documents
    sequential = list(NspPairBuilder(64, np.random.default_rng(4))(docs))
    assert np.mean([len({p.document for p in sequential[i:i + 32]})
                    for i in range(0, len(sequential) - 31, 32)]) < 6
    # interleaving only reorders: every document gives about as many pairs either way
    assert abs(len(pairs) - len(sequential)) < 0.05 * len(pairs)


def test_interleaved_pairs_keep_berts_rules():
    docs = book_documents(n_docs=100)
    owner = {int(t): d for d, doc in enumerate(docs) for s in doc for t in s}
    pairs = list(NspPairBuilder(48, np.random.default_rng(5), open_documents=16)(docs))
    labels = np.array([p.label for p in pairs])
    assert 0.45 < labels.mean() < 0.55
    for a, b, label, document in pairs:
        assert owner[int(a[0])] == document and len(a) + len(b) + 3 <= 48
        if label == IS_RANDOM:
            assert owner[int(b[0])] != document
        else:
            assert owner[int(b[-1])] == document and b[0] > a[-1]
    # each document hands out its pairs in random order (see the pipeline's stretch test)
    starts = [[int(p.a[0]) for p in pairs if p.document == d] for d in range(len(docs))]
    in_order = [s == sorted(s) for s in starts if len(s) > 4]
    assert len(in_order) > 20 and not any(in_order)


def test_batch_writer_takes_ids_and_word_starts_apart():
    a = np.array([10, 11, 12]) | (np.array([1, 0, 1]) * WORD_START)
    b = np.array([13, 14]) | (np.array([0, 1]) * WORD_START)
    writer = BatchWriter(1, 8, synthetic_vocabulary(100))
    writer.add(a, b, IS_NEXT)
    b = writer.take()
    ids, starts = b.input_ids.numpy(), b.word_starts.numpy()
    assert ids[0].tolist() == [CLS_ID, 10, 11, 12, SEP_ID, 13, 14, SEP_ID]
    assert starts[0].tolist() == [False, True, False, True, False, False, True, False]


def test_a_lone_sentence_gets_a_random_b_as_in_bert():
    rng = np.random.default_rng(6)
    docs = [[np.arange(100 * d, 100 * d + int(rng.integers(8, 20)))] for d in range(200)]
    pairs = list(NspPairBuilder(64, np.random.default_rng(7), short_seq_prob=0.0)(docs))
    # the first has no other document to draw from yet, and splits its sentence instead
    assert pairs[0].label == IS_NEXT and all(p.label == IS_RANDOM for p in pairs[1:])
    for p in pairs[1:]:  # A is the whole sentence (not half of it), B another document's
        assert len(p.a) == len(docs[p.document][0]) and p.b[0] // 100 != p.document


def test_a_chunk_of_one_sentence_inside_a_document_gets_a_random_b_as_in_bert():
    # Every sentence is longer than the target, so every chunk is one sentence: BERT makes all
    # of them random pairs (it does not borrow the next sentence for an actual-next pair).
    docs = [[np.arange(1000 * d + 40 * s, 1000 * d + 40 * s + 40) for s in range(20)]
            for d in range(30)]
    pairs = list(NspPairBuilder(32, np.random.default_rng(3), short_seq_prob=0.0)(docs))
    later = pairs[20:]  # past the first document's pairs, when another document is open
    assert len(later) > 400
    assert all(p.label == IS_RANDOM for p in later), np.mean([p.label for p in later])
    for p in later:
        assert p.a[0] // 1000 == p.document and p.b[0] // 1000 != p.document


def test_the_target_length_is_drawn_for_every_pair_not_once_a_book():
    # One book: drawn once, its target would make every pair long or every pair short. Drawn
    # for every pair (as Megatron does), a book gives both, and the share of pairs built to a
    # short target stays short_seq_prob whatever the book.
    book = [np.arange(10 + 5 * s, 15 + 5 * s) for s in range(3000)]
    other = [[np.arange(20000 + 5 * s, 20005 + 5 * s) for s in range(50)]]
    pairs = [p for p in NspPairBuilder(64, np.random.default_rng(8), short_seq_prob=0.5,
                                       open_documents=2)(other + [book]) if p.document == 1]
    lengths = np.array([len(p.a) + len(p.b) for p in pairs])
    assert len(pairs) > 300
    # a long target fills 61 tokens (a 5-token sentence at a time), half the pairs; a short
    # one is uniform in 2..61, so about a quarter of the pairs are shorter than 30 tokens
    assert 0.3 < np.mean(lengths >= 56) < 0.8 and 0.1 < np.mean(lengths < 30) < 0.4
