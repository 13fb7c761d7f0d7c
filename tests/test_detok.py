"""Incremental detokenization and stop strings."""

from reasonmaxxer.steering.detok import TextStream

TEXT = "Let x be 5. Then 3x + 5 = 20 and Überraschung 東京 émigré. The answer is \\boxed{72}."


def _run(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    return pieces, stream


def test_pieces_concatenate_to_the_decoded_text(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    pieces, _ = _run(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_is_cut_and_never_shown_even_in_part(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    pieces, stream = _run(tokenizer, ids, stop=["3x + 5"])
    assert stream.stopped
    assert "".join(pieces) == "Let x be 5. Then "
    shown = ""
    for p in pieces:
        shown += p
        assert "3x" not in shown


def test_stop_string_absent_keeps_everything(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    pieces, stream = _run(tokenizer, ids, stop=["never there"])
    assert not stream.stopped
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
