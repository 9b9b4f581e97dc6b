"""The SPIN workers: the programs that run inside an iteration's Kubernetes Jobs.

- ``generate``: the generation Job (vLLM, or transformers where vLLM is missing): the opponent model samples
  a synthetic response per prompt, one shard per Job index, optionally scoring reference log-probs.
- ``train``: the training Job (DeepSpeed under torchrun): the SPIN loss on real vs synthetic responses.
- ``data`` (datasets, the one prompt template, shards, mixing), ``batching``, ``loss``, ``runtime`` and
  ``tiny`` (a tiny local model and dataset for tests and the demo) support them.

Nothing here imports the controller side of spin-k8s; the only shared module is ``spin_k8s.storage``.
"""
