#!/usr/bin/env bash
# Regenerates tests/data/speech_16k.wav: a few seconds of real synthetic speech for the frontend
# tests, made with Debian's espeak-ng (voice en-us) and sox, 16 kHz mono 16-bit PCM.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp --suffix .wav)
espeak-ng -v en-us -s 160 -w "$tmp" "The quick brown fox jumps over the lazy dog. Seven, three, nine."
sox "$tmp" -D -r 16000 -c 1 -b 16 speech_16k.wav
rm -f "$tmp"
