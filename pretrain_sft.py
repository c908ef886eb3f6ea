#!/usr/bin/env python
r"""Supervised fine-tuning on packed chat data with Megatron-Core.

    torchrun --nproc-per-node 8 pretrain_sft.py --config yaml_configs/llama3.1_8b_32k.yaml \
        [--config more.yaml ...] [--section.key=value ...] [--eval-only]
    python pretrain_sft.py --config yaml_configs/recipes/sft_converted_1gpu.yaml \
        --checkpoint.pretrained=CONVERTED --data.train_prefix=data/sft

How the config is composed, later wins key by key (sections merge; a list or scalar is replaced
whole): each ``--config`` file in the order given, then the ``--section.key=value`` overrides.
When ``checkpoint.pretrained`` is a converted model (``tools/convert_hf_to_megatron.py`` output)
or a trainer checkpoint, its config.yaml gives the model section, so a recipe needs no
``model:``; a model value also given explicitly must equal it (except ``attention_backend`` and
``max_position_embeddings``). Unknown keys are errors naming their file and dotted key.

``--help`` lists every config key with its docstring. ``--eval-only`` prints exactly one line,
``eval_loss=<float> eval_tokens=<int>``, for the checkpoint in ``checkpoint.load`` (or
``checkpoint.pretrained``, or the initial weights) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron_sft.errors import SFTError  # noqa: E402
from megatron_sft.launch import slurm_to_torch_env  # noqa: E402
from megatron_sft.config import (ConfigError, config_help, config_to_yaml, ineffective_settings,  # noqa: E402
                                 load_config)

logger = logging.getLogger("megatron_sft")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--config", action="append", default=[],
                        help="YAML file with config sections; repeat it to layer files (later ones win)")
    parser.add_argument("--eval-only", action="store_true", help="only compute the validation loss")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(__doc__ + "\nConfig keys (YAML sections, or --section.key=value):" + config_help())
        sys.exit(0)
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        slurm_to_torch_env()  # srun-launched ranks (tools/launch/slurm_sft.sbatch); torchrun sets its own
    except SFTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, overrides, world_size=world_size, has_cuda=torch.cuda.is_available())
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.eval_only and not cfg.data.valid_prefix:
        print(ConfigError(["--eval-only needs data.valid_prefix: set --data.valid_prefix=PREFIX"]), file=sys.stderr)
        return 2

    from megatron_sft.runtime import initialize_distributed, setup_model_parallel, teardown_model_parallel
    from megatron_sft.training.loop import Trainer
    from megatron_sft.training.metrics import setup_logging

    initialize_distributed()
    setup_logging(torch.distributed.get_rank())
    trainer = None
    try:
        setup_model_parallel(cfg.parallel, seed=cfg.training.seed)
        p = cfg.parallel
        logger.info("world size %d = TP %d x PP %d x CP %d x DP %d", world_size, p.tensor_model_parallel_size,
                    p.pipeline_model_parallel_size, p.context_parallel_size, world_size // p.model_parallel_size)
        logger.info("resolved config:\n%s", config_to_yaml(cfg))
        for note in ineffective_settings(cfg):
            logger.warning("note: %s", note)
        trainer = Trainer(cfg, eval_only=args.eval_only)
        if args.eval_only:
            report = trainer.evaluate()
            if torch.distributed.get_rank() == 0:
                print(f"eval_loss={report.loss:.6f} eval_tokens={report.num_targets}", flush=True)
        else:
            trainer.train()
        return 0
    except SFTError as err:  # a user's problem, said with its fix; anything else is a bug: traceback
        print(f"error: {err}", file=sys.stderr)  # every rank: the failing one may not be rank 0
        return 1
    finally:
        # Ending (saved, done or failed): a late SIGTERM (SLURM signals every task, not all at the
        # same moment) must not kill the process during shutdown, when Python has already put the
        # default action back, and turn a clean exit into "killed by SIGTERM".
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if trainer is not None:
            trainer.close()
        teardown_model_parallel()


if __name__ == "__main__":
    sys.exit(main())
