"""What a warm Ray worker process imports while it idles (the local head's `RAY_preload_python_modules`).

A Train worker (TRAIN_WORKER_MARKER in its environment) gets the whole training stack, including what
transformers imports on first use; the task that runs fit() and the Train
controller with its helper actors (RUN_ENV) get Ray Train, torch and our trainer; any other process
(the Jobs API's supervisor, our channel) gets nothing, as before. See workers/warm_pool.py.

Then the imported objects are moved out of the garbage collector's sight (`gc.freeze`): they live as
long as the process, and without this every full collection walks all of them (measured in
bench/README.md).
"""

import gc
import os

from workers.conventions import RUN_MARKER, TRAIN_WORKER_VAR

if os.environ.get(TRAIN_WORKER_VAR):
    import peft  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import workers.ray_job  # noqa: F401  (and with it workers.train_worker)
elif os.environ.get(RUN_MARKER):
    import workers.ray_job  # noqa: F401

if os.environ.get(TRAIN_WORKER_VAR) or os.environ.get(RUN_MARKER):
    gc.collect()
    gc.freeze()
