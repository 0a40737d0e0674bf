"""Students sharded with FSDP2, under `accelerate launch --config_file configs/accelerate/fsdp.yaml`.

A sharded model's forward is a collective: each of its FSDP units gathers its parameters from every process. So
every process must run the same forwards: a generation loop steps until the rows of *all* processes have finished
(processes sample different inputs, of different lengths). And a model is entered through its root's forward (or
`generate`, registered as one), whose hooks set FSDP up and gather the root unit's parameters: an encoder called
directly would find them sharded. Saving gathers the whole state dict: every process sends its shards, one writes.
"""

from __future__ import annotations

import os

import accelerate
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

from distilgen.config import ConfigError


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded across processes (FSDP2's `fully_shard`, as accelerate's FSDP2 applies it)."""
    return isinstance(model, FSDPModule)


def on_every_process(flag: torch.Tensor) -> bool:
    """Whether the bool tensor `flag` holds on every process (a collective: all must ask)."""
    value = flag.to(torch.int32)  # the backends reduce integers, not bools
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def check_launch(accelerator: Accelerator) -> None:
    """An FSDP launch shards, or stops in one line before any work: accelerate 1.15 shards only on accelerators,
    and elsewhere would quietly train data-parallel, each process holding the whole student. (The CLI refuses
    FSDP1 before accelerate starts: its unwrapped model does not gather its parameters to generate.)"""
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        and accelerator.distributed_type != DistributedType.FSDP
    ):
        raise ConfigError(
            "accelerate launch",
            f"FSDP was asked for, but accelerate {accelerate.__version__} shards only on GPUs and other accelerators; "
            "on this machine it would train unsharded, data-parallel: launch without FSDP",
        )


def group_shared_embedding(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Before `accelerator.prepare`: put every module that holds the input embedding's weight into one FSDP unit.

    accelerate 1.15 gives the input embedding and a tied output layer a unit of their own, and torch refuses a
    weight seen by two units. An encoder-decoder's encoder and decoder hold the embedding in modules of their own
    (BART, T5), which would stay in the root unit: they join the embedding's unit here, and accelerate, which
    leaves a module already sharded alone, shards the rest as configured.
    """
    if not accelerator.is_fsdp2:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    weight = model.get_input_embeddings().weight
    holders = [m for m in model.modules() if any(p is weight for p in m.parameters(recurse=False))]
    if len(holders) <= 2:  # the embedding and a tied output layer: accelerate's own grouping holds them
        return
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy or MixedPrecisionPolicy()
    # like accelerate's unit of the embedding: kept gathered after the forward, which the backward needs again
    fully_shard(holders, mp_policy=policy, offload_policy=plugin.cpu_offload, reshard_after_forward=False)


def whole_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's weights gathered whole, on the main process ({} elsewhere; every process must call).
    Tied weights share one tensor, as in the model, so that `save_pretrained` writes each once."""
    weights = accelerator.get_state_dict(model)
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for first, *tied in names.values():
        for name in tied:
            if first in weights:
                weights[name] = weights[first]
    return weights
