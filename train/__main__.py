"""`python -m train [--config FILE] [--FLAG VALUE ...]`: see `python -m train --help` and the README."""

from __future__ import annotations

import json
import sys

from train.config import from_args
from whisper_config import ConfigError


def main(argv: list[str] | None = None) -> int:
    from train.data import DataError
    from train.loop import Trainer, TrainingError
    from whisper_io import TokenizerError

    try:
        config, args = from_args(argv)
        if args.distributed:
            import jax

            jax.distributed.initialize()  # TPU pods and SLURM/Kubernetes clusters configure themselves
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        result = Trainer(config).run()
    except (ConfigError, DataError, TokenizerError, TrainingError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"step": result.step, "stopped_early": result.stopped_early, "skipped_steps": result.skipped_steps}
    summary.update(result.data)
    if result.eval:
        summary.update({k: v for k, v in result.eval.items() if k != "examples"})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
