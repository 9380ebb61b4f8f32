"""Start flashserve under torchrun (one process per rank, on one host or several).

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        -m flashserve.distributed.launch serve --model DIR --tensor-parallel-size 8 --pipeline-parallel-size 2

Every process joins torchrun's rendezvous (``env://``: MASTER_ADDR / MASTER_PORT / RANK /
WORLD_SIZE). Global rank 0 runs the flashserve command line given after the module name (serve,
generate, bench ...); its engine drives the other ranks exactly as it drives the ranks it spawns
itself (``flashserve.distributed.executor``). Ranks 1..N-1 wait on the store for the engine's
configuration, build their Worker on ``cuda:LOCAL_RANK`` (or the CPU) and follow rank 0's plans.
"""

from __future__ import annotations

import datetime
import gc
import os
import pickle
import sys

import torch.distributed as dist

_STORE: dist.Store | None = None
_ARGS_KEY = "launch/engine"


def torchrun_store() -> dist.Store | None:
    """The rendezvous store when this process is rank 0 under torchrun (else None)."""
    return _STORE


def publish_engine(store: dist.Store, *args: object) -> None:
    """Rank 0: hand the engine's (config, model config, max_model_len, eos ids) to the other ranks."""
    store.set(_ARGS_KEY, pickle.dumps(args))


def main(argv: list[str] | None = None) -> int:
    from flashserve.distributed.executor import RANK_ENV, _store_timeout

    os.environ.update(RANK_ENV)
    store, rank, world = next(dist.rendezvous("env://", timeout=_store_timeout(300.0)))
    store = dist.PrefixStore("flashserve", store)
    if rank == 0:
        import flashserve.distributed.launch as this  # run as __main__ by ``-m``: set the imported module's

        this._STORE = store
        from flashserve.cli import main as cli_main

        code = cli_main(sys.argv[1:] if argv is None else argv)
        # Free what the command left (the engine's gloo groups, the store) while the interpreter
        # is whole: left to interpreter exit, their teardown aborted this rank after its output
        # ("terminate called without an active exception") in 5 of 60 runs of the torchrun
        # test's command on a 2-core host, and in none of 60 with this.
        this._STORE = None
        gc.collect()
        return code
    store.wait([_ARGS_KEY], datetime.timedelta(hours=1))  # rank 0 loads the tokenizer and config first
    config, model_config, max_model_len, eos_token_ids = pickle.loads(store.get(_ARGS_KEY))
    if config.world_size != world:
        raise SystemExit(f"flashserve: torchrun started {world} processes but the engine asks for "
                         f"{config.world_size} ranks (tensor x pipeline parallel size)")
    from flashserve.distributed.executor import run_rank

    run_rank(store, rank, world, config.distributed_timeout_s, config, model_config, max_model_len, eos_token_ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
