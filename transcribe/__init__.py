"""Transcription above the model packages: `python -m transcribe`, and the pieces it is made of.

`Transcriber` loads a checkpoint of any format into `flax_whisper` or `torch_ref`;
`transcribe_files` decodes files into `openai-whisper`-shaped results; `transcribe.outputs`
writes them as txt, vtt, srt, tsv and json.
"""

from transcribe.pipeline import Transcriber, file_windows, mel_windows, transcribe_files, window_samples

__all__ = ["Transcriber", "file_windows", "mel_windows", "transcribe_files", "window_samples"]
