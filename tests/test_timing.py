"""The pieces of word alignment (`transcribe.timing`) against openai-whisper's own: dynamic time
warping (its numba recurrence, ties included), the median filter, and the alignment of a
structured attention pattern whose word times are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transcribe import timing


@pytest.mark.parametrize("shape", [(1, 1), (3, 9), (12, 40), (40, 300)])
@pytest.mark.parametrize("levels", [None, 3], ids=["continuous", "ties"])
def test_dtw_follows_openai_step_for_step(shape, levels):
    """The same path as `whisper.timing.dtw_cpu` on random costs, and on costs of three values
    only, where its tie-breaking (a diagonal or vertical step only when strictly cheapest) decides."""
    from whisper.timing import dtw_cpu

    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) if levels is None else rng.integers(0, levels, shape).astype(np.float64)
    expected = dtw_cpu(x.copy())
    text, time = timing.dtw(x)
    np.testing.assert_array_equal(text, expected[0])
    np.testing.assert_array_equal(time, expected[1])
    assert text[0] == 0 and time[0] == 0 and text[-1] == shape[0] - 1 and time[-1] == shape[1] - 1


@pytest.mark.parametrize("frames", [2, 3, 4, 50])
def test_median_filter_is_openais(frames):
    from whisper.timing import median_filter

    x = np.random.default_rng(frames).standard_normal((2, 5, frames)).astype(np.float32)
    expected = median_filter(torch.from_numpy(x), 7).numpy()
    np.testing.assert_array_equal(timing.median_filter(x, 7), expected)


def test_a_diagonal_attention_gives_each_word_its_frames():
    """Alignment heads where the position predicting text token k looks at encoder position
    10 + 25 k (two heads, one noisier): the path moves to a token where its position becomes the
    likeliest, half-way from the previous token's (12.5 positions, 0.25 s, earlier), so a word
    starts there (the first at 0) and ends where the next word starts."""
    from whisper_io.tokenizers import WhisperTokenizer

    tokenizer = WhisperTokenizer(51865)
    text = tokenizer.encode(" One two three, four five.")
    prompt = list(tokenizer.sot_sequence("en"))
    sequence = [*prompt, *text, tokenizer.eot]
    looks = np.zeros(len(sequence))
    looks[len(prompt) - 1 :] = 10 + 25 * np.arange(len(text) + 2)  # from the token before the text
    qk = -0.05 * np.abs(np.arange(1500)[None, :] - looks[:, None])  # (T, S): a peak at each look
    heads = np.stack([qk, qk + np.random.default_rng(0).normal(0, 0.05, qk.shape)]).astype(np.float32)

    def scores(window, tokens):
        assert list(tokens) == sequence
        return np.zeros((len(tokens), 51865), np.float32), heads

    words = timing.find_alignment(scores, tokenizer, "en", "transcribe", text, np.zeros((80, 3000)), 3000)
    assert [w.word for w in words] == [" One", " two", " three", ",", " four", " five", "."]
    firsts = np.cumsum([0] + [len(w.tokens) for w in words])
    for word, first, after in zip(words, firsts[:-1], firsts[1:], strict=True):
        assert word.start == pytest.approx(max(0, 10 + 25 * first - 12.5) / 50, abs=0.06), word
        assert word.end == pytest.approx((10 + 25 * after - 12.5) / 50, abs=0.06), word
        assert word.probability == pytest.approx(1 / tokenizer.eot)  # uniform logits
