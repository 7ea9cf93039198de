"""`python -m train [--config FILE] [--FLAG VALUE ...]`: see `python -m train --help` and the README."""

from __future__ import annotations

import json
import sys

from train.config import from_args
from whisper_config import ConfigError


def main(argv: list[str] | None = None) -> int:
    from convert.rules import ConversionError
    from train.checkpointing import CheckpointError
    from train.data import DataError
    from train.loop import Trainer, TrainingError
    from train.run_folder import RunFolderError
    from whisper_io import TokenizerError
    from whisper_io.outputs import OutputError

    errors = (
        CheckpointError,
        ConfigError,
        ConversionError,
        DataError,
        OutputError,
        RunFolderError,
        TokenizerError,
        TrainingError,
        OSError,
    )
    try:
        config, args = from_args(argv)
        if args.print_config:
            model = None if config.init_from else config.model_config().to_dict()  # validates the model
            print(json.dumps({"train": config.to_dict(), "model": model, "run_dir": str(config.run_path)}, indent=2))
            return 0
        if args.distributed:
            import jax

            jax.distributed.initialize()  # TPU pods and SLURM/Kubernetes clusters configure themselves
        result = Trainer(config).run()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped without saving (the last checkpoint is kept)", file=sys.stderr)
        return 130
    summary = {"step": result.step, "stopped_early": result.stopped_early, "skipped_steps": result.skipped_steps}
    summary.update(result.data)
    if result.eval:
        summary.update({k: v for k, v in result.eval.items() if k != "examples"})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
