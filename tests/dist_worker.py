"""One rank of the distributed-collection test: gloo on loopback, the same tasks on every rank."""

import os
import sys

import torch
import torch.distributed as dist

import sketchfisher as sf
from sketchfisher.store import collect_to_store
from tiny_models import generic_loss, make_batches, make_model


def main(path: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    backend = os.environ.get("SF_BACKEND", "gloo")  # "nccl": one GPU per rank (device runs)
    if distributed:
        dist.init_process_group(backend, init_method="env://")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))  # (a node's own GPUs under torchrun)
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = make_model("gpt2", seed=5).to(device)
    if distributed and os.environ.get("SF_FSDP") in ("1", "uneven"):  # FSDP2: every block and the root sharded
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    to = lambda bs: [{k: v.to(device) for k, v in b.items()} for b in bs]  # noqa: E731
    sizes = ((8, 2), (6, 3)) if os.environ.get("SF_FSDP") == "1" else ((9, 2), (7, 3))  # FSDP: as many batches per rank
    ta, tb = to(make_batches(*sizes[0], seed=1)), to(make_batches(*sizes[1], seed=2))
    stats_dtype = getattr(torch, os.environ["SF_STATS_DTYPE"]) if "SF_STATS_DTYPE" in os.environ else None
    collect_to_store(path, model, generic_loss, ta, tb, sf.layout_for(model), sf.Sketch(k=16, kind="sjlt", seed=2),
                     sf.ScoreConfig(), checkpoint_every=2, stats_dtype=stats_dtype)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
