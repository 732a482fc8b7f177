"""Entry point of a distillation job: `torchrun --nproc-per-node N -m cloud.distributed.run
--job job.json`, or `python -m cloud.distributed.run --job job.json` for world size 1.

Exit codes: 0 done, 2 bad job spec or inputs (ConfigError), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from cloud.distributed.job import run_job
from cloud.distributed.runtime import LaunchEnv, Runtime
from cloud.distributed.spec import STAGES, DistillJobSpec
from shared.errors import ConfigError

log = logging.getLogger("cloud.distributed")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, join the process group the launcher set up, run the job."""
    parser = argparse.ArgumentParser(prog="python -m cloud.distributed.run")
    parser.add_argument("--job", required=True, help="job spec JSON (DistillJobSpec)")
    parser.add_argument("--stage", choices=STAGES, default="all",
                        help="label: only fill the label cache; distill: only train")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per process (0: torch's default)")
    args = parser.parse_args(argv)
    env = LaunchEnv.from_environ(os.environ)  # torchrun's contract; read here and only here
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{env.rank} %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = DistillJobSpec.from_json(args.job)
        runtime = Runtime(env, spec.backend)
        try:
            outcome = run_job(spec, runtime, args.stage)
        finally:
            runtime.close()
    except ConfigError as e:
        log.error("%s", e)
        return 2
    log.info("job done: labels %d/%d cached, metrics %s", outcome.labels.hits,
             outcome.labels.samples, {k: round(v, 4) for k, v in outcome.metrics.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
