"""`python -m flax_whisper.transcribe`: the earlier name of `python -m transcribe`, kept for one
release. Transcription lives in the top-level `transcribe` package, above the model packages;
this alias imports it only when run as a command."""

if __name__ == "__main__":
    import sys

    print("notice: `python -m flax_whisper.transcribe` is now `python -m transcribe`", file=sys.stderr)
    from transcribe.__main__ import main

    sys.exit(main(prog="python -m flax_whisper.transcribe"))
