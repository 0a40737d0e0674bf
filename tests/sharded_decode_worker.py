"""One process of `test_sharding.test_a_sharded_model_decodes_what_the_unsharded_one_does`, under torchrun:
shard a saved model over the processes (FSDP2, layers and embedding units as accelerate makes them), sample this
process's own inputs with `decode`, and write the tokens to OUT/rank{R}.pt."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from distilgen.config import GenerationSettings, ModelConfig
from distilgen.generation.decode import decode
from distilgen.models import load_model
from distilgen.sharding import embedding_holders

model_dir, out_dir = sys.argv[1:3]
dist.init_process_group("gloo")
rank = dist.get_rank()
tm = load_model(ModelConfig(path=model_dir))
model = tm.model
for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
    fully_shard(layer)
fully_shard(embedding_holders(model))
fully_shard(model)
inputs = torch.load(f"{out_dir}/inputs.pt")[rank]
settings = GenerationSettings(kind="sample", max_new_tokens=24)
with torch.no_grad():
    tokens = decode(tm, inputs["batch"], settings, seeds=inputs["seeds"])
torch.save(tokens, f"{out_dir}/rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
