"""train/data.py: JSONL reading, chat loss masks, packing (first-fit, split overflow) and batch order, each
against hand-computed or brute-force expectations."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from qwen35_jax.tokenizer import Tokenizer
from train.data import (DataError, PackedDataset, load_dataset, pack_documents, read_jsonl, tokenize_examples,
                        tokenize_example)

HEADER = "<|im_start|>assistant\n"
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "It jumps over the lazy dog."},
        {"role": "user", "content": "naïve café 東京?"},
        {"role": "assistant", "content": "emoji 🚀 and 12345 digits."}]


@pytest.fixture(scope="module")
def tok(bpe_folder):
    return Tokenizer.load(bpe_folder)


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def runs(tok, ids, learn):
    """(flag, decoded text) of each maximal run of equal loss flags."""
    out = []
    for flag, group in itertools.groupby(zip(ids.tolist(), learn.tolist()), key=lambda x: x[1]):
        out.append((flag, tok.decode([i for i, _ in group])))
    return out


def counted_pairs(rows):
    """Multiset of (input token, target) at every position the loss counts."""
    on = rows["loss_mask"] > 0
    return Counter(zip(rows["input_ids"][on].tolist(), rows["targets"][on].tolist()))


def expected_pairs(docs):
    return Counter((int(ids[t]), int(ids[t + 1])) for ids, learn in docs for t in range(len(ids) - 1)
                   if learn[t + 1])


# ---- chat loss mask ------------------------------------------------------------------------------------
def test_chat_mask_is_exactly_the_assistant_replies(tok):
    ids, learn = tokenize_example({"messages": CHAT}, tok)
    assert ids.dtype == np.int32 and learn.dtype == bool and ids.shape == learn.shape
    full = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    # Each reply: from the end of an assistant header to the next turn (or the end), incl. <|im_end|>\n.
    starts = [k + len(HEADER) for k in range(len(full)) if full.startswith(HEADER, k)]
    replies = [full[s:full.find("<|im_start|>", s) if "<|im_start|>" in full[s:] else len(full)] for s in starts]
    assert replies == ["It jumps over the lazy dog.<|im_end|>\n", "emoji 🚀 and 12345 digits.<|im_end|>\n"]
    assert [text for flag, text in runs(tok, ids, learn) if flag] == replies
    assert tok.decode(ids) == full


def test_chat_mask_with_reasoning_and_thinking_switch(tok):
    chat = CHAT[:4] + [dict(CHAT[4], reasoning_content="digits first")]
    for kwargs in ({}, {"enable_thinking": False}):
        ids, learn = tokenize_example({"messages": chat}, tok, chat_kwargs=kwargs)
        assert tok.decode(ids) == tok.apply_chat_template(chat, add_generation_prompt=False, **kwargs)
        # The thinking generation prompt ends in "<think>\n": the reasoning after it is learned.
        assert [text for flag, text in runs(tok, ids, learn) if flag] == [
            "It jumps over the lazy dog.<|im_end|>\n",
            "digits first\n</think>\n\nemoji 🚀 and 12345 digits.<|im_end|>\n"]


def test_history_rewriting_conversation_becomes_one_document_per_turn(tok, tmp_path):
    rewritten = [CHAT[1], dict(CHAT[2], reasoning_content="r1"), CHAT[3], dict(CHAT[4], reasoning_content="r2")]
    docs = tokenize_examples({"messages": rewritten}, tok, where="d.jsonl:1")
    assert len(docs) == 2
    for (ids, learn), end in zip(docs, (2, 4)):
        context = rewritten[:end]
        assert tok.decode(ids) == tok.apply_chat_template(context, add_generation_prompt=False)
        learned = [text for flag, text in runs(tok, ids, learn) if flag]
        reply = context[-1]
        assert learned == [f"{reply['reasoning_content']}\n</think>\n\n{reply['content']}<|im_end|>\n"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": rewritten}])
    assert len(load_dataset(path, tok, 256).rows["input_ids"]) == 1  # both documents packed in one row


def test_chat_errors_name_the_source(tok, bpe_folder):
    rewritten = [CHAT[1], dict(CHAT[2], reasoning_content="r"), CHAT[3], CHAT[4]]  # reasoning dropped later
    with pytest.raises(DataError, match=r"d\.jsonl:4: .*rewrites history.*split the conversation"):
        tokenize_example({"messages": rewritten}, tok, where="d.jsonl:4")
    with pytest.raises(DataError, match=r"d\.jsonl:5: .*no assistant message"):
        tokenize_example({"messages": CHAT[:2]}, tok, where="d.jsonl:5")
    plain = Tokenizer(tok.backend, None, tok.eos_token_ids, {})
    with pytest.raises(DataError, match="no chat template|has none"):
        tokenize_example({"messages": CHAT}, plain)


def test_text_gets_first_eos(tok):
    ids, learn = tokenize_example({"text": "The lazy fox"}, tok)
    assert ids.tolist() == tok.encode("The lazy fox") + [tok.token_id("<|im_end|>")] and learn.all()
    ids, _ = tokenize_example({"text": "The lazy fox"}, tok, add_eos=False)
    assert ids.tolist() == tok.encode("The lazy fox")


# ---- packing -------------------------------------------------------------------------------------------
def doc(k, n, off=()):
    """Document k: tokens 10*(k+1)+j, learn flags True except at positions `off`."""
    learn = np.ones(n, bool)
    learn[list(off)] = False
    return np.arange(n, dtype=np.int32) + 10 * (k + 1), learn


def test_pack_matches_hand_layout():
    # seq_len 8, lengths 5 4 3 2 6 1: first fit puts docs 0,2 in row 0; 1,3 in row 1; 4 in row 2; drops doc 5.
    docs = [doc(0, 5, [2]), doc(1, 4), doc(2, 3, [2]), doc(3, 2), doc(4, 6, [0]), doc(5, 1)]
    rows = pack_documents(docs, 8)
    assert rows["input_ids"].tolist() == [[10, 11, 12, 13, 14, 30, 31, 32], [20, 21, 22, 23, 40, 41, 0, 0],
                                          [50, 51, 52, 53, 54, 55, 0, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0],
                                          [0, 1, 2, 3, 4, 5, 0, 0]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0],
                                            [1, 1, 1, 1, 1, 1, 0, 0]]
    assert rows["targets"].tolist() == [[11, 12, 13, 14, 0, 31, 32, 0], [21, 22, 23, 0, 41, 0, 0, 0],
                                        [51, 52, 53, 54, 55, 0, 0, 0]]
    assert rows["loss_mask"].tolist() == [[1, 0, 1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 1, 0, 0, 0],
                                          [1, 1, 1, 1, 1, 0, 0, 0]]
    assert {k: v.dtype for k, v in rows.items()} == {
        "input_ids": np.int32, "positions": np.int32, "segment_ids": np.int32, "targets": np.int32,
        "loss_mask": np.float32}


def naive_first_fit(lengths, seq_len):
    fill, places = [], []
    for n in lengths:
        row = next((r for r, used in enumerate(fill) if used + n <= seq_len), len(fill))
        if row == len(fill):
            fill.append(0)
        places.append((row, fill[row]))
        fill[row] += n
    return places, len(fill)


def test_pack_random_docs_against_brute_force():
    rng = np.random.default_rng(0)
    seq_len = 16
    lengths = rng.integers(0, seq_len + 1, size=60)
    docs = [doc(k, int(n), rng.choice(n, min(n, 2), replace=False)) for k, n in enumerate(lengths)]
    rows = pack_documents(docs, seq_len)
    kept = [d for d in docs if len(d[0]) >= 2]
    places, num_rows = naive_first_fit([len(ids) for ids, _ in kept], seq_len)
    assert rows["input_ids"].shape == (num_rows, seq_len)
    for (ids, learn), (row, offset) in zip(kept, places):
        n = len(ids)
        assert rows["input_ids"][row, offset:offset + n].tolist() == ids.tolist()
        assert rows["positions"][row, offset:offset + n].tolist() == list(range(n))
        assert len(set(rows["segment_ids"][row, offset:offset + n].tolist())) == 1
        assert rows["targets"][row, offset:offset + n].tolist() == ids[1:].tolist() + [0]
    assert counted_pairs(rows) == expected_pairs(docs)
    # No target crosses a segment; padding is segment 0 with nothing counted.
    seg = rows["segment_ids"]
    crossing = np.concatenate([seg[:, 1:] != seg[:, :-1], np.ones((num_rows, 1), bool)], axis=1)
    assert (rows["targets"][crossing] == 0).all() and (rows["loss_mask"][crossing | (seg == 0)] == 0).all()


def test_split_counts_every_pair_once():
    seq_len = 8
    ids, learn = doc(0, 20, [3, 9, 17])  # 2.5 * seq_len
    rows = pack_documents([(ids, learn)], seq_len)
    assert counted_pairs(rows) == expected_pairs([(ids, learn)])
    assert sum(counted_pairs(pack_documents([(ids, np.ones(20, bool))], seq_len)).values()) == 19
    # Pieces [0, 8), [7, 15), [14, 20): three segments (one per row) starting at position 0.
    assert rows["input_ids"][:, 0].tolist() == [10, 17, 24] and (rows["positions"][:, 0] == 0).all()


def test_reject_and_bad_overflow(tok, tmp_path):
    long_text = "The quick brown fox jumps over the lazy dog. " * 3
    path = write_jsonl(tmp_path / "file.jsonl", [{"text": "short"}, {"text": long_text}])
    n = len(tok.encode(long_text)) + 1
    with pytest.raises(DataError, match=rf"file\.jsonl:2: {n} tokens, longer than seq_len 16"):
        load_dataset(path, tok, 16, overflow="reject")
    with pytest.raises(DataError, match="overflow"):
        pack_documents([doc(0, 3)], 8, overflow="truncate")


def test_load_dataset_end_to_end(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "The lazy fox"}, "", {"messages": CHAT}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "naïve café " * 8}])
    data = load_dataset([a, str(b)], tok, 24)
    docs = [tokenize_example(e, tok) for p in (a, b) for e in read_jsonl(p)]
    assert counted_pairs(data.rows) == expected_pairs(docs)
    assert data.seq_len == 24 and len(data) == len(data.rows["input_ids"])


def test_prompt_completion_learns_only_the_completion_and_eos(tok):
    ids, learn = tokenize_example({"prompt": "The lazy", "completion": " fox jumps"}, tok)
    prompt, completion = tok.encode("The lazy"), tok.encode(" fox jumps")
    assert ids.tolist() == prompt + completion + [tok.eos_token_ids[0]]
    assert learn.tolist() == [False] * len(prompt) + [True] * (len(completion) + 1)


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ('{"text": "a",}', r"malformed JSON \(.*line 1 column"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "a"}', "a 'prompt' example needs a 'completion' field"),
    ('{"input": "a"}', "expected a 'text', 'prompt'/'completion' or 'messages' field"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', "expected one of the fields"),
    ('{"text": 5}', "'text' must be a string"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": [{"content": "x"}]}', r"messages\[0\] must be an object with a string 'role'"),
])
def test_bad_lines_name_file_and_line(tmp_path, tok, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {message}"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        load_dataset(path, tok, 16)


def test_missing_file_and_chat_error_in_file(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*no assistant message"):
        load_dataset(path, tok, 64)


# ---- batches -------------------------------------------------------------------------------------------
def marked_rows(num_rows, seq_len=4):
    """Rows whose every field holds the row index, so a batch shows which rows it took."""
    fields = ("input_ids", "positions", "segment_ids", "targets")
    rows = {k: np.repeat(np.arange(num_rows, dtype=np.int32)[:, None], seq_len, 1) for k in fields}
    rows["loss_mask"] = rows["targets"].astype(np.float32)
    return rows


def test_batches_are_deterministic_and_cover_each_epoch():
    R, seed = 7, 3
    stream = np.concatenate([np.random.default_rng([seed, e]).permutation(R) for e in range(20)])
    for B in (3, 7, 12):  # B < R (wraps mid-batch), B == R, B > R
        data = PackedDataset(marked_rows(R))
        later = [data.batch(s, B, seed) for s in (3, 4, 5)]  # asked first: a resumed run
        fresh = PackedDataset(marked_rows(R))
        straight = [fresh.batch(s, B, seed) for s in range(6)][3:]
        for x, y, s in zip(later, straight, (3, 4, 5)):
            assert all((x[k] == y[k]).all() for k in x)
            assert x["input_ids"][:, 0].tolist() == stream[s * B:(s + 1) * B].tolist()
            assert x["input_ids"].shape == (B, 4)
    data = PackedDataset(marked_rows(R))
    epoch = np.concatenate([data.batch(s, 2, seed)["input_ids"][:, 0] for s in range(7)])  # 14 = 2 epochs
    assert sorted(epoch[:R].tolist()) == list(range(R)) and sorted(epoch[R:].tolist()) == list(range(R))
    assert epoch[:R].tolist() != epoch[R:].tolist()  # a fresh permutation each epoch
    assert data.epoch_of(7, 2) == 2.0 and data.epoch_of(1, 2) == pytest.approx(2 / 7)
    assert data.batch(0, 4, seed=4)["input_ids"][:, 0].tolist() != data.batch(0, 4, seed)["input_ids"][:, 0].tolist()
