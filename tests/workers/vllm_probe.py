"""Runs the generation worker with ONE vLLM engine for several shards (vLLM starts slowly on CPU):
``python vllm_probe.py ARGS...`` with the worker's arguments; writes ``{output}/a`` (shards 0 and 1 of 2),
``{output}/b`` (shard 0 again) and ``{output}/greedy`` (shard 0 of 1 at temperature 0)."""

from __future__ import annotations

import dataclasses
import os
import sys


def main() -> None:
    from transformers import AutoTokenizer

    from spin_k8s import storage
    from spin_k8s.workers import generate, runtime

    base = generate.settings_from_args(sys.argv[1:])
    model_dir = runtime.fetch_model(base.model, base.cache_dir)
    engine = generate.open_engine(base, model_dir, AutoTokenizer.from_pretrained(model_dir))
    try:
        for shard in (0, 1):
            out = storage.join(base.output, "a")
            assert generate.run(dataclasses.replace(base, shard_index=shard, num_shards=2, output=out), engine) == 0
        out = storage.join(base.output, "b")
        assert generate.run(dataclasses.replace(base, shard_index=0, num_shards=2, output=out), engine) == 0
        greedy = dataclasses.replace(base, shard_index=0, num_shards=1, temperature=0.0,
                                     output=storage.join(base.output, "greedy"))
        assert generate.run(greedy, engine) == 0
    finally:
        engine.close()


if __name__ == "__main__":  # vLLM re-imports the main module in its engine process
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
