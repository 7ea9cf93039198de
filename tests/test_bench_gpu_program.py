"""What the accelerator benchmarks run, checked without an accelerator: `bench/gpu_program.py`'s
reading of a compiled program (here XLA:CPU's, the same HLO text the deviceless GPU compilation
gives): each launch and the bytes it writes, loops counted as they run; `bench/gpu.sh`'s
commands, each read by its script's argument parser; `bench/tpu_program.py`'s count of
collectives and its word where libtpu is missing."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from gpu_program import arguments, computations, kernels, report

ROOT = Path(__file__).parent.parent


def test_a_loop_body_counts_as_often_as_it_runs_and_is_the_per_token_report(capsys):
    """A seven-step loop between two launches of its own: the program's launches are the
    entry's own plus seven times the body's (each 64 x 64 float32 result 16,384 bytes), only the
    entry's own when loops are not followed, and a loop report (decoding's) is the body's."""

    @jax.jit
    def run(x, w):
        return jax.lax.fori_loop(0, 7, lambda i, y: jnp.tanh(y @ w) + i, x) * 2

    text = run.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
    comps = computations(text)
    entry = re.search(r"^ENTRY %([\w.\-]+)", text, re.M).group(1)
    (body,) = re.findall(r"body=%([\w.\-]+)", text)
    own, per_step = kernels(comps, entry, loops=False), kernels(comps, body)
    assert per_step and any(size == 64 * 64 * 4 for _, size in per_step)
    assert sorted(kernels(comps, entry)) == sorted(own + per_step * 7)
    report("decode", text, loop=True)
    assert capsys.readouterr().out.startswith(f"decode: {len(per_step)} kernels per token")


def test_every_command_of_the_gpu_runbook_is_one_its_script_accepts(tmp_path):
    """`DRY_RUN=1 bash bench/gpu.sh` prints every stage's command without running it; each
    benchmark's own argument parser reads its arguments, which checks the flags, the sizes, the
    mechanisms and the attention implementations (a misspelt one would cost a lent GPU's minutes),
    and the test stage selects the marker the GPU tests carry."""
    import inference
    import train_step

    env = {**os.environ, "DRY_RUN": "1", "PYTHON": "python"}
    logs = tmp_path / "logs"  # the log folder a real run would make; the default stages ("")
    printed = subprocess.run(
        ["bash", "bench/gpu.sh", "", str(logs)], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    lines = printed.stdout.splitlines()
    assert {line.split(":", 1)[0] for line in lines} == {
        "train", "decode32", "decode1", "tests", "mechanisms", "flags", "profile"
    }  # fmt: skip
    assert not logs.exists()  # nothing ran
    parsers = {"bench/train_step.py": train_step.arguments(), "bench/inference.py": inference.arguments()}
    read = 0
    for line in lines:
        python, script, *argv = [
            word for word in shlex.split(line.split(": ", 1)[1]) if not word.startswith("XLA_FLAGS=")
        ]
        assert python == "python"
        if script == "-m":
            assert (
                argv[:3] == ["pytest", "-m", "gpu"]
                and "pytestmark = pytest.mark.gpu" in (ROOT / "tests" / "test_gpu.py").read_text()
            )
            continue
        try:
            parsers[script].parse_args(argv)
        except SystemExit:
            pytest.fail(f"{script} refuses {' '.join(argv)} (bench/gpu.sh, stage {line.split(':', 1)[0]})")
        read += 1
    assert read == 11


def test_the_program_reader_refuses_a_misspelt_name_before_compiling_anything(capsys):
    """`bench/gpu_program.py`'s parser reads the programs as train or decode with a batch size,
    and the size and mechanism from the project's own lists; anything else is a usage error."""
    parser = arguments()
    args = parser.parse_args(["--programs", "train,decode1,decode32", "--mechanism", "hybrid", "--size", "tiny"])
    assert (args.programs, args.mechanism, args.size) == (["train", "decode1", "decode32"], "hybrid", "tiny")
    assert parser.parse_args([]).programs == ["train", "decode1", "decode32"]
    misspelt = {"--programs": "train,decod32", "--mechanism": "dynamic-conv", "--size": "smal"}
    for flag, value in [*misspelt.items(), ("--programs", "decode0")]:
        with pytest.raises(SystemExit):
            parser.parse_args([flag, value])
        assert value.split(",")[-1] in capsys.readouterr().err.splitlines()[-1]


def test_the_tpu_program_counts_each_collective_once_and_names_what_it_needs():
    """`bench/tpu_program.py`: a collective is counted once whether XLA emits it whole or as an
    asynchronous start/done pair (its result a tuple, whose text holds spaces); an instruction's
    name (`%all-gather.3`) is not an operation. Without libtpu (as here, unless installed) the
    command says what to install rather than failing in jax."""
    import tpu_program

    text = """
  %all-gather.3 = bf16[8,768]{1,0} all-gather(%p.1), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %collective-permute-start.2 = (bf16[4,768]{1,0}, bf16[4,768]{1,0}) collective-permute-start(%p.2), channel_id=2
  %collective-permute-done.2 = bf16[4,768]{1,0} collective-permute-done(%collective-permute-start.2)
  %all-reduce-start = (f32[], f32[]) all-reduce-start(%a, %b), channel_id=3, to_apply=%add
  %all-reduce-done = (f32[], f32[]) all-reduce-done(%all-reduce-start)
  %reduce-scatter.1 = f32[96]{0} reduce-scatter(%g), channel_id=4, dimensions={0}, to_apply=%add
  %fusion.7 = bf16[4,768]{1,0} fusion(%all-gather.3), kind=kLoop, calls=%fused_computation
"""
    assert tpu_program.collectives(text) == {
        "all-gather": 1, "all-reduce": 1, "collective-permute": 1, "reduce-scatter": 1
    }  # fmt: skip
    args = tpu_program.arguments().parse_args(["--topology", "v4:2x2x2", "--fsdp", "4", "--tensor", "2"])
    assert (args.topology, args.fsdp, args.tensor, args.size, args.layers) == ("v4:2x2x2", 4, 2, "small", "scan")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match=r"needs libtpu \(pip install 'jax\[tpu\]'\)"):
            tpu_program.main(["--size", "tiny"])
