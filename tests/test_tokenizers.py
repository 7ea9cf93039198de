"""Tokenizers: Whisper's, checked against the openai-whisper package, and the byte-level one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import whisper
from conftest import BLOCK_TORCH, openai_dims, tiny_config

from whisper_io import ByteTokenizer, TokenizerError, WhisperTokenizer, tokenizer_for
from whisper_io.decoding import decoding_options

TEXT = "Hello world, ça va? Grüße aus Köln — 東京 42."


@pytest.mark.parametrize("n_vocab", [51864, 51865, 51866], ids=["en", "multilingual", "large-v3"])
def test_whisper_tokenizer_matches_openai(n_vocab):
    """Ids, prompts and the suppressed set are those OpenAI's DecodingTask uses for this vocabulary."""
    openai_model = whisper.model.Whisper(openai_dims(n_vocab=n_vocab, n_mels=80 if n_vocab < 51866 else 128))
    ours = WhisperTokenizer(n_vocab)
    multilingual = n_vocab > 51864
    language = "de" if multilingual else None
    for task in ("transcribe", "translate") if multilingual else ("transcribe",):
        options = whisper.DecodingOptions(language=language, task=task, without_timestamps=True, fp16=False)
        openai_task = whisper.decoding.DecodingTask(openai_model, options)
        reference = openai_task.tokenizer
        assert ours.sot_sequence(language, task) == tuple(openai_task.initial_tokens)
        assert ours.suppress_tokens == openai_task._get_suppress_tokens()
    assert (ours.eot, ours.sot) == (reference.eot, reference.sot)
    assert ours.vocab_size == n_vocab
    assert ours.blank_tokens == (*reference.encode(" "), reference.eot)
    assert ours.encode(TEXT) == reference.encode(TEXT)
    assert ours.decode(ours.encode(TEXT)) == TEXT
    assert ours.decode([ours.sot, *ours.encode("hi"), ours.eot]) == "hi"  # special tokens are skipped
    assert ours.language_tokens == (tuple(reference.all_language_tokens) if multilingual else ())
    assert ours.multilingual == multilingual


def test_whisper_tokenizer_needs_no_torch():
    code = BLOCK_TORCH + (
        "from whisper_io import WhisperTokenizer\n"
        "t = WhisperTokenizer(51865); assert t.decode(t.encode('no torch here')) == 'no torch here'\n"
        "assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_whisper_tokenizer_rejects_bad_options():
    multilingual, english = WhisperTokenizer(51865), WhisperTokenizer(51864)
    with pytest.raises(TokenizerError, match="Unsupported language"):
        multilingual.sot_sequence("klingon")
    with pytest.raises(TokenizerError, match="task must be one of"):
        multilingual.sot_sequence("en", "summarize")
    with pytest.raises(TokenizerError, match="no language or task tokens"):
        english.sot_sequence("de")


def test_byte_tokenizer_round_trips_text():
    tokenizer = ByteTokenizer(320)
    ids = tokenizer.encode(TEXT)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(TEXT.encode("utf-8"))
    assert tokenizer.decode([tokenizer.sot, *ids, tokenizer.eot]) == TEXT
    assert tokenizer.sot_sequence() == (257,)
    # The start token and the ids the tokenizer never produces are not sampled.
    assert tokenizer.suppress_tokens == (257, *range(258, 320))
    assert tokenizer.blank_tokens == (32, 256)
    assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character decodes to U+FFFD
    with pytest.raises(TokenizerError, match="no language"):
        tokenizer.sot_sequence("en")


def test_tokenizer_is_chosen_from_the_vocabulary():
    assert isinstance(tokenizer_for(tiny_config(n_vocab=51865, decoder_start_token_id=None)), WhisperTokenizer)
    byte_config = tiny_config(n_vocab=258, decoder_start_token_id=257, n_text_ctx=8)
    assert isinstance(tokenizer_for(byte_config), ByteTokenizer)
    with pytest.raises(TokenizerError, match="needs n_vocab >= 258"):
        tokenizer_for(tiny_config(n_vocab=96))
    with pytest.raises(TokenizerError, match="decoder_start_token_id is 1"):
        tokenizer_for(tiny_config(n_vocab=300, decoder_start_token_id=1))
    prompt, options = decoding_options(tokenizer_for(byte_config), byte_config)
    assert prompt == (257,) and options.max_new_tokens == 4 and options.language_tokens == ()  # OpenAI: n_text_ctx // 2
    _, longest = decoding_options(tokenizer_for(byte_config), byte_config, max_new_tokens=8)
    assert longest.max_new_tokens == 8  # as many as the context holds
