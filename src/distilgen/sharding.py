"""Students sharded with FSDP2, under `accelerate launch --config_file configs/accelerate/fsdp.yaml`.

A sharded model's forward is a collective: each of its FSDP units gathers its parameters from every process. So
every process must run the same forwards: a generation loop steps until the rows of *all* processes have finished
(processes sample different inputs, of different lengths). And a model is entered through its root's forward (or
`generate`, registered as one), whose hooks set FSDP up and gather the root unit's parameters: an encoder called
directly would find them sharded. Saving gathers the whole state dict: every process sends its shards, one writes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from distilgen.config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

REFUSED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
"""What `accelerate launch --use_deepspeed / --use_megatron_lm` set in the environment: engines whose models
distilgen does not sample or save."""


def _launched_with(key: str) -> bool:
    """Whether `accelerate launch` set the flag `key` in the environment (accelerate reads it in any case)."""
    return os.environ.get(key, "").lower() == "true"


def launch_refusal() -> str | None:
    """Why distilgen does not run under this `accelerate launch`, if it does not. Read from what the launch set in
    the environment, before accelerate starts (its FSDP1 plugin fails on a machine without a GPU). FSDP1 is
    refused because its unwrapped model does not gather its parameters to generate."""
    engine = next((name for key, name in REFUSED_ENGINES.items() if _launched_with(key)), None)
    if engine is not None:
        return (
            f"`accelerate launch` asked for {engine}, which distilgen does not run: it shards a student with FSDP2 "
            "(accelerate launch --config_file configs/accelerate/fsdp.yaml). A teacher too large for one device: serve "
            "it (vLLM, TGI) and set teacher.kind=api (README: 'Models larger than one device')"
        )
    if _launched_with("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        return (
            "`accelerate launch` asked for FSDP1; distilgen runs FSDP2: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml), or pass --fsdp_version 2"
        )
    return None


def check_launch(accelerator: Accelerator) -> None:
    """An FSDP launch shards, or stops in one line before any work: accelerate 1.15 shards only on accelerators,
    and elsewhere would quietly train data-parallel, each process holding the whole student."""
    import accelerate
    from accelerate.utils import DistributedType

    if _launched_with("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        raise ConfigError(
            "accelerate launch",
            f"FSDP was asked for, but accelerate {accelerate.__version__} shards only on GPUs and other accelerators; "
            "on this machine it would train unsharded, data-parallel: launch without FSDP",
        )


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded across processes (FSDP2's `fully_shard`, as accelerate's FSDP2 applies it)."""
    return isinstance(model, FSDPModule)


def on_every_process(flag: torch.Tensor) -> bool:
    """Whether the bool tensor `flag` holds on every process (a collective: all must ask)."""
    value = flag.to(torch.int32)  # the backends reduce integers, not bools
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def embedding_holders(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that hold the input embedding's weight: the embedding, a tied output layer, and an
    encoder-decoder's own encoder and decoder embeddings (BART, T5). FSDP2 needs them in one unit."""
    weight = model.get_input_embeddings().weight
    return [m for m in model.modules() if any(p is weight for p in m.parameters(recurse=False))]


def group_shared_embedding(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Before `accelerator.prepare`: put every module that holds the input embedding's weight into one FSDP unit.

    accelerate 1.15 gives the input embedding and a tied output layer a unit of their own, and torch refuses a
    weight seen by two units. An encoder-decoder's encoder and decoder embeddings would stay in the root unit:
    they join the embedding's unit here, and accelerate, which leaves a module already sharded alone, shards the
    rest as configured.
    """
    if not accelerator.is_fsdp2:
        return
    holders = embedding_holders(model)
    if len(holders) <= 2:  # the embedding and a tied output layer: accelerate's own grouping holds them
        return
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)  # accelerate's, where a parallelism config makes one
    fully_shard(
        holders,
        mesh=mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        offload_policy=plugin.cpu_offload,
        reshard_after_forward=False,  # as accelerate's embedding unit: the backward needs it again
    )


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


def release(model: torch.nn.Module) -> None:
    """Free the parameters a sharded model still holds gathered (its root and embedding units keep them after a
    forward), once its stage is done."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
