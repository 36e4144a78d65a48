"""Subprocess worker for the resume test: collects a sketch store slowly so that it can be killed."""

import sys
import time

import sketchfisher as sf
from sketchfisher.store import collect_to_store
from tiny_models import generic_loss, make_batches, make_model


def slow_loss(model, batch):
    time.sleep(0.08)
    return generic_loss(model, batch)


def main(path: str, passes: float = 2) -> None:
    model = make_model("llama_gqa", seed=3)
    ta, tb = make_batches(24, 1, seed=1), make_batches(20, 1, seed=2)
    collect_to_store(path, model, slow_loss, ta, tb, sf.layout_for(model), sf.Sketch(k=32, kind="sjlt", seed=4),
                     sf.ScoreConfig(), checkpoint_every=3, passes=passes)


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:]))
