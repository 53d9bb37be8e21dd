"""A swapped squared circuit trains under DistributedDataParallel (gloo, 2 CPU processes)
with the same gradients as one process on the whole batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adapters.cirkit import rank_policy, swap_kronecker_sum_layers

from .builders import compile_pair

WORLD = 2
BATCH = 8


class SquaredNLL(nn.Module):
    """Mean negative log-likelihood of a squared circuit and its partition function."""

    def __init__(self, circuit, partition):
        super().__init__()
        self.circuit, self.partition = circuit, partition

    def forward(self, x):
        return -(self.circuit(x).real[:, 0, 0] - self.partition().real[0, 0]).mean()


def build_model() -> SquaredNLL:
    torch.set_default_dtype(torch.float64)
    circuit, partition = compile_pair("quad-tree", "cp", "complex-lse-sum", True, optimize=False)
    swap_kronecker_sum_layers(circuit, rank_policy("lowrank", 2))
    swap_kronecker_sum_layers(partition, rank_policy("lowrank", 2))
    return SquaredNLL(circuit, partition)


def data() -> torch.Tensor:
    return torch.randint(0, 3, (BATCH, 16), generator=torch.Generator().manual_seed(5))


def _worker(rank: int, port: int, state_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = build_model()
        if rank == 0:  # rank 1 starts from other values: DDP's initial broadcast must fix that
            model.load_state_dict(torch.load(state_path))
        ddp = DistributedDataParallel(model)
        shard = data().chunk(WORLD)[rank]
        ddp(shard).backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_one_process(tmp_path):
    previous = torch.get_default_dtype()
    try:
        model = build_model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))  # differ from a fresh build
        torch.save(model.state_dict(), tmp_path / "state.pt")
        model(data()).backward()
        expected = {n: p.grad for n, p in model.named_parameters()}
        mp.spawn(_worker, args=(free_port(), str(tmp_path / "state.pt"), str(tmp_path)), nprocs=WORLD, join=True)
        for rank in range(WORLD):
            grads = torch.load(tmp_path / f"grads{rank}.pt")
            assert set(grads) == set(expected)
            for name, grad in grads.items():
                assert torch.allclose(grad, expected[name], rtol=1e-9, atol=1e-12), (rank, name)
        structured = [n for n in expected if ".structured." in n]
        assert structured  # the structured layers' own parameters are among those synced
    finally:
        torch.set_default_dtype(previous)
