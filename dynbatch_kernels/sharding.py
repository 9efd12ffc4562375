"""DTensor parameters (FSDP2's ``fully_shard``): the local shard each rank works on, and the process group
over which per-tensor sums of those shards add up to the whole tensor's.

A rank's segment of a DTensor parameter is its local shard (``p._local_tensor``), read and written where
FSDP2 keeps it. Elementwise work needs nothing more; a per-tensor norm (LAMB's ``|w|_j``, ``|u|_j``, the
clipping norm) is the sum over the shards: one all-reduce of the ``[S, k]`` table of partial sums over
:attr:`Sharding.group`. Optimizer state is kept the same way: flat buffers of local shards, presented in
``optimizer.state`` as DTensors with the parameter's mesh and placements (so
``torch.distributed.checkpoint`` saves and reshards it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (``torch.distributed.tensor`` not imported: none exists yet)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor FSDP2 keeps, not a copy); any other tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class Sharding:
    """How the DTensor parameters of one optimizer are split: every one over the same mesh, sharded
    (``Shard(d)``, any ``d``) along mesh dimension ``mesh_dim`` and replicated along the others (FSDP2:
    a 1-D mesh; HSDP: ``(Replicate(), Shard(0))``). ``group`` is that dimension's process group."""

    mesh: object
    mesh_dim: int
    group: dist.ProcessGroup

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]]) -> Sharding | None:
        """The sharding of ``named`` parameters, None when none is a DTensor; raises for what the
        optimizers cannot sum exactly (plain tensors mixed in, several meshes, ``Partial`` placements,
        tensors sharded along several or no mesh dimensions)."""
        sharded = [(name, p) for name, p in named if is_dtensor(p)]
        if not sharded:
            return None
        plain = next((name for name, p in named if not is_dtensor(p)), None)
        if plain is not None:
            raise TypeError(
                f"{plain}: a plain tensor among DTensor (FSDP2) parameters; shard the whole model with "
                "fully_shard (its root module too), or give the plain parameters to another optimizer"
            )
        from torch.distributed.tensor import Replicate, Shard

        first_name, first = sharded[0]
        mesh, mesh_dim = first.device_mesh, None
        for name, p in sharded:
            if p.device_mesh != mesh:
                raise ValueError(
                    f"{name}: on device mesh {p.device_mesh}, {first_name} on {mesh}; one optimizer steps "
                    "parameters of one mesh"
                )
            dims = [k for k, placement in enumerate(p.placements) if isinstance(placement, Shard)]
            other = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
            if other or len(dims) != 1 or (mesh_dim is not None and dims[0] != mesh_dim):
                raise ValueError(
                    f"{name}: placements {tuple(p.placements)}; expected Shard along one mesh dimension"
                    + ("" if mesh_dim is None else f" (dimension {mesh_dim}, as {first_name})")
                    + " and Replicate along the others, as fully_shard makes them"
                )
            mesh_dim = dims[0]
        return cls(mesh=mesh, mesh_dim=mesh_dim, group=mesh.get_group(mesh_dim))

    def sum_over_shards(self, tables: list[torch.Tensor]) -> None:
        """Add each table (per-segment partial sums of this rank's shards) over the shards, in place: one
        all-reduce of all of them together."""
        if not tables:
            return
        joined = torch.cat([t.reshape(-1) for t in tables])
        dist.all_reduce(joined, group=self.group)
        for table, summed in zip(tables, joined.split([t.numel() for t in tables])):
            table.copy_(summed.view_as(table))

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        """A one-element partial sum (e.g. ``|g|^2`` of this rank's shards) summed over the shards."""
        dist.all_reduce(value, group=self.group)
        return value

    @staticmethod
    def state_view(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A DTensor over ``local`` (this rank's part of a state tensor, shaped like the parameter's local
        shard) with ``param``'s mesh, placements, shape and stride; it shares ``local``'s memory."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )

    @staticmethod
    def local_piece(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``full`` (a whole, unsharded tensor shaped like ``param``), split as
        ``param`` is (``torch.chunk`` along each sharded dimension, as DTensor's ``Shard``)."""
        from torch.distributed.tensor import Shard

        coordinate = param.device_mesh.get_coordinate()
        piece = full
        for k, placement in enumerate(param.placements):
            if isinstance(placement, Shard):
                pieces = torch.chunk(piece, param.device_mesh.size(k), dim=placement.dim)
                index = coordinate[k]
                piece = pieces[index] if index < len(pieces) else piece.narrow(placement.dim, 0, 0)
        return piece
