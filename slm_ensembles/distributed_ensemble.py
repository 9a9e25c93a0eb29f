"""An ensemble spread over processes (decentralised inference): each process holds some of a saved ensemble's
members, and every prediction is combined across processes with a collective, so only next-token scores cross
between machines.

    torchrun --nproc_per_node 2 generate.py RUN "What is the capital of France?" --distributed
    torchrun --nproc_per_node 2 score.py RUN --distributed                       # the run's held-out CE
    torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint HOST:29500 score.py RUN --distributed

Process r of P holds members [r*K/P, (r+1)*K/P) of the K (contiguous blocks, sizes differing by at most one); all
processes must reach the same saved ensemble and tokenizer (checked at start, by name). Every combine mode is a sum
over members, so one collective per prediction gives every process the same combined logits, exactly up to the
order of summation:
- logits, weighted, additive: each process sums its members' weighted logits (1/K each for logits), and one
  all-reduce (sum) of a vocabulary row per position adds the processes' parts;
- probs: log p_mix = log sum_k p_k - log K, summed stably: an all-reduce (max) of each process's largest
  log-probability per position (one number), then an all-reduce (sum) of sum_k exp(log p_k - max).
With exchange="topk", the processes first exchange the indices of their parts' k largest entries (4 bytes each),
then each sends its exact values at all of these candidates (P x k floats) and one fill value, instead of its
vocabulary row (4 bytes an entry): every candidate token gets its exact combined score, every other token the sum
of the fills, each the mean of that process's other entries (for probs: their mean probability mass), so each part
keeps its total. The greedy token is the exact path's whenever it is a candidate; score.py --exchange topk measures
how often it is not, and what the CE loses, on the test split.

Faults: every collective fails after `timeout_s` (gloo and NCCL time-outs), and a process that died breaks its
connections at once. Each process records in the rendezvous store how many collectives it has started, so the
processes still running name those behind them (dead, or stalled before the collective) in a LostProcessError; each
then closes its connections, so that the others' collectives fail at once too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

import checksums
from ensemble import (DAMAGED_ADVICE, WEIGHTED_MODES, EnsembleConfig, ModelEnsemble, load_member,
                      saved_ensemble_config, saved_generation_config)
from slm_ensembles.processes import LostProcessError

EXCHANGES = ("full", "topk")
INDEX_DTYPE = torch.int32  # top-k indices on the wire: vocabularies fit 31 bits
FAULT_GRACE_S = 3.0  # how long the process holding the store keeps it after a collective failed
PROGRESS_KEY = "slm_ensemble_progress/"


class MismatchedEnsembleError(ValueError):
    """The processes did not all load the same saved ensemble (or tokenizer)."""


class LaunchError(ValueError):
    """The process was not started by a launcher that tells it its rank (torchrun, srun)."""


@dataclasses.dataclass
class Processes:
    """This process's place in the group that runs the ensemble: its rank, the group's size, its device, and the
    rendezvous store that outlives a failed collective, where each process records how many collectives it has
    started: after a failure, the processes behind the others are the ones that died or stalled."""

    rank: int
    world_size: int
    device: torch.device
    store: dist.Store
    timeout_s: float
    holds_store: bool = False  # rank 0 without torchrun (whose agent holds it otherwise)
    collectives_started: int = 0

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """`tensor` reduced over every process (in place, and returned); LostProcessError when one is gone."""
        self._run(lambda: dist.all_reduce(tensor, op=op))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's `tensor` (all of one shape), in rank order; LostProcessError when one is gone."""
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run(lambda: dist.all_gather(gathered, tensor.contiguous()))
        return gathered

    def all_gather_object(self, value) -> list:
        """Every process's picklable `value`, in rank order; LostProcessError when one is gone."""
        gathered = [None] * self.world_size
        self._run(lambda: dist.all_gather_object(gathered, value))
        return gathered

    def _run(self, collective) -> None:
        self.collectives_started += 1
        self.store.set(f"{PROGRESS_KEY}{self.rank}", str(self.collectives_started))
        try:
            collective()
        except RuntimeError as error:  # gloo and NCCL errors (DistBackendError is one): a peer is gone or late
            message = self.lost_message(error)
            self.release_the_others()
            raise LostProcessError(message) from error

    def progress(self) -> list[int]:
        """How many collectives each process has started, as the store holds it (0 before its first)."""
        keys = [f"{PROGRESS_KEY}{rank}" for rank in range(self.world_size)]
        return [int(self.store.get(key)) if self.store.check([key]) else 0 for key in keys]

    def lost_message(self, error: Exception) -> str:
        """Which processes did not reach the collective that failed: those whose progress is behind this one's."""
        try:
            behind = [rank for rank, started in enumerate(self.progress()) if started < self.collectives_started]
        except (RuntimeError, OSError):  # the store is gone with the process that held it
            behind = [0]
        if not behind:  # every process reached it: it failed for another reason
            return f"a collective of the ensemble's {self.world_size} processes failed on rank {self.rank}: {error}"
        names = ", ".join(str(rank) for rank in behind)
        return (f"rank {names} of the ensemble's {self.world_size} processes stopped answering (died, or stalled "
                f"past the {self.timeout_s:g} s time-out); rank {self.rank} stops too. Its members' share of every "
                f"prediction is missing: restart all processes ({type(error).__name__}: {first_line(error)})")

    def release_the_others(self) -> None:
        """Close this process's connections, so that the others' collectives fail now rather than at their time-out;
        the process holding the store keeps it FAULT_GRACE_S longer, for them to read the progress in it."""
        dist.destroy_process_group()
        if self.holds_store:
            time.sleep(FAULT_GRACE_S)


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def launched_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun or SLURM's srun set them; LaunchError when neither did."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    raise LaunchError("--distributed runs one process per share of the members: launch it with torchrun (for "
                      "example `torchrun --nproc_per_node 2 generate.py RUN PROMPT --distributed`) or srun, which "
                      "tell each process its rank (RANK and WORLD_SIZE, or SLURM_PROCID and SLURM_NTASKS)")


def start_processes(timeout_s: float = 60.0, device: str = "auto") -> Processes:
    """Join the process group the launcher set up (MASTER_ADDR and MASTER_PORT name its rendezvous): gloo on CPU,
    NCCL on GPUs (process r on GPU LOCAL_RANK). Every collective fails after `timeout_s` instead of waiting forever."""
    rank, world_size, local_rank = launched_rank()
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise LaunchError(f"{key} is not set: torchrun sets it; under srun export the first node's address "
                              "and a free port as MASTER_ADDR and MASTER_PORT")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's agent holds the store (its workers are clients); without it, rank 0 holds it.
    holds_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=holds_store, timeout=timeout)
    if use_cuda:
        torch.cuda.set_device(torch_device)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.PrefixStore("slm_ensemble_group", store),
                            rank=rank, world_size=world_size, timeout=timeout)
    return Processes(rank, world_size, torch_device, store, timeout_s, holds_store)


def members_of_rank(member_count: int, rank: int, world_size: int) -> range:
    """The members process `rank` holds: a contiguous block, the blocks' sizes differing by at most one."""
    if world_size > member_count:
        raise LaunchError(f"{world_size} processes for an ensemble of {member_count} member(s): start at most "
                          f"{member_count}, one member or more each")
    return range(rank * member_count // world_size, (rank + 1) * member_count // world_size)


class DistributedEnsemble(ModelEnsemble):
    """The members of a saved ensemble that this process holds, predicting with the whole ensemble's combined
    logits: its `combined` step adds the other processes' parts (see the module's docstring). Everything else,
    generation with its per-member KV caches, `member_hidden_states` and `logits_from_hidden` for scoring, is the
    ModelEnsemble's, on this process's members."""

    def __init__(self, config: EnsembleConfig, members: Sequence, member_indices: range, processes: Processes,
                 exchange: str = "full", exchange_k: int = 64):
        if exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {exchange!r}: use one of {EXCHANGES}")
        local = EnsembleConfig(member_subfolders=[config.member_subfolders[i] for i in member_indices],
                               combine=config.combine, vocab_size=config.vocab_size,
                               weights=None if config.weights is None else [config.weights[i] for i in member_indices])
        super().__init__(local, members)
        self.whole_config = config
        self.member_indices = member_indices
        self.processes = processes
        self.exchange = exchange
        self.exchange_k = exchange_k

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, processes: Processes, exchange: str = "full",
                        exchange_k: int = 64, **member_load_kwargs) -> DistributedEnsemble:
        """This process's members of the ensemble saved in `folder`, on its device, each checked against its
        checksums.json first (ensemble.load_member; the ensemble's folder too, where it has one); every process must
        reach the same ensemble (`check_same_ensemble`)."""
        checksums.check_intact(Path(folder), DAMAGED_ADVICE)
        config = saved_ensemble_config(folder)
        indices = members_of_rank(len(config.member_subfolders), processes.rank, processes.world_size)
        members = [load_member(folder, config.member_subfolders[index], device_map=processes.device,
                               **member_load_kwargs) for index in indices]
        ensemble = cls(config, members, indices, processes, exchange, exchange_k)
        ensemble.generation_config = saved_generation_config(folder, ensemble.generation_config)
        return ensemble

    @property
    def total_members(self) -> int:
        return len(self.whole_config.member_subfolders)

    def combined(self, member_logits: Sequence[torch.Tensor], exchange: str | None = None) -> torch.Tensor:
        """The whole ensemble's combined logits (fp32), from this process's members' `member_logits` and the other
        processes' parts: exactly (`exchange` "full") or exactly only at the processes' top-k candidates ("topk");
        default: the ensemble's own `exchange`."""
        exchange = exchange or self.exchange
        if self.config.combine == "probs":
            log_probs = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in member_logits])
            return self._log_mass_sum(torch.logsumexp(log_probs, dim=0), exchange) - math.log(self.total_members)
        if self.config.combine in WEIGHTED_MODES:
            coefficients = self.config.weights
        else:
            coefficients = [1.0 / self.total_members] * len(member_logits)
        part = coefficients[0] * member_logits[0].float()
        for coefficient, z in zip(coefficients[1:], member_logits[1:], strict=True):
            part = part + coefficient * z.float()
        return self._sum(part, exchange)

    def _sum(self, part: torch.Tensor, exchange: str) -> torch.Tensor:
        """The sum over processes of each one's `part` [..., V]."""
        if exchange == "full":
            return self.processes.all_reduce(part.contiguous())
        return top_k_sum(self._gathered_top_k(part), part.shape[-1])

    def _log_mass_sum(self, log_mass: torch.Tensor, exchange: str) -> torch.Tensor:
        """log of the sum over processes of exp(`log_mass`) [..., V], each process's its members' summed
        probabilities, computed without overflow or underflow."""
        if exchange == "full":
            peak = self.processes.all_reduce(log_mass.amax(dim=-1, keepdim=True).contiguous(), dist.ReduceOp.MAX)
            mass = self.processes.all_reduce((log_mass - peak).exp().contiguous())
            return mass.log() + peak
        return top_k_log_sum_exp(self._gathered_top_k(log_mass, log_space=True), log_mass.shape[-1])

    def _gathered_top_k(self, part: torch.Tensor, log_space: bool = False) -> list[SparsePart]:
        """Every process's `part` at the candidate tokens (the union of all processes' top `exchange_k`), with the
        fill of its other entries, in rank order: two messages, the top-k indices (int32), then the values."""
        k = min(self.exchange_k, part.shape[-1])
        own = part.topk(k, dim=-1).indices.to(INDEX_DTYPE)
        candidates = torch.cat(self.processes.all_gather(own), dim=-1).long()
        sent = sparse_part(part, candidates, log_space)
        gathered = self.processes.all_gather(torch.cat([sent.values, sent.fill], dim=-1))
        return [SparsePart(both[..., :-1], candidates, both[..., -1:]) for both in gathered]

    def exchanged_bytes_per_position(self, exchange: str | None = None) -> int:
        """What each process sends per scored position: a vocabulary row of fp32 (plus one max for probs), or its
        k top indices, then its values at every process's (P x k) and the fill."""
        exchange = exchange or self.exchange
        vocab = self.config.vocab_size or self.members[0].get_output_embeddings().weight.shape[0]
        if exchange == "topk":
            return top_k_bytes(min(self.exchange_k, vocab), self.processes.world_size)
        return 4 * vocab + (4 if self.config.combine == "probs" else 0)


def top_k_bytes(k: int, world_size: int) -> int:
    """What a process sends per position in the top-k exchange: its k indices (int32), then its fp32 values at all
    world_size x k candidates and one fill."""
    return k * INDEX_DTYPE.itemsize + 4 * (world_size * k + 1)


@dataclasses.dataclass(frozen=True)
class SparsePart:
    """A process's part [..., V] as the others see it: its exact values at the candidate tokens and, for every other
    token, one fill value: their mean (in log space: the log of their mean probability mass), so that the part's
    total is kept."""

    values: torch.Tensor  # [..., C]
    indices: torch.Tensor  # [..., C], int64; a token may repeat (with the same value)
    fill: torch.Tensor  # [..., 1]

    def dense(self, vocab_size: int) -> torch.Tensor:
        shape = (*self.values.shape[:-1], vocab_size)
        return self.fill.expand(shape).clone().scatter_(-1, self.indices, self.values)


def sparse_part(part: torch.Tensor, candidates: torch.Tensor, log_space: bool = False) -> SparsePart:
    """`part` at the `candidates` [..., C] and the fill of its other entries: their mean, or with `log_space` (a
    part that is a log of probability mass) the log of their mean mass. The mean is what most entries are about for
    a member that only corrects the others (additive), whose largest and smallest entries both matter: the
    candidates hold the exact values wherever any process ranks a token high."""
    chosen = torch.zeros_like(part, dtype=torch.bool).scatter_(-1, candidates, True)
    others = (~chosen).sum(-1, keepdim=True)
    if log_space:
        outside = part.masked_fill(chosen, float("-inf")).logsumexp(-1, keepdim=True)
        fill = outside - others.clamp(min=1).log()
    else:
        fill = part.masked_fill(chosen, 0.0).sum(-1, keepdim=True) / others.clamp(min=1)
    return SparsePart(part.gather(-1, candidates), candidates, fill)


def top_k_sum(parts: Sequence[SparsePart], vocab_size: int) -> torch.Tensor:
    """The sum over processes of their parts, each as its candidates and fill give it."""
    total = parts[0].dense(vocab_size)
    for part in parts[1:]:
        total = total + part.dense(vocab_size)
    return total


def top_k_log_sum_exp(parts: Sequence[SparsePart], vocab_size: int) -> torch.Tensor:
    """log sum over processes of exp(part), each part as its candidates and fill give it."""
    total = parts[0].dense(vocab_size)
    for part in parts[1:]:
        total = torch.logaddexp(total, part.dense(vocab_size))
    return total


def ensemble_description(folder: str | os.PathLike, tokenizer) -> dict:
    """What must be the same on every process: the saved ensemble's config.json, each member folder's checksums.json
    (or its config.json where it has none), and the tokenizer's vocabulary (sha256 digests)."""
    folder = Path(folder)
    config = saved_ensemble_config(folder)

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    members = {}  # only the member folders this machine holds
    for subfolder in config.member_subfolders:
        record = folder / subfolder / checksums.CHECKSUMS
        record = record if record.is_file() else folder / subfolder / "config.json"
        if record.is_file():
            members[subfolder] = digest(record.read_bytes())
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {"ensemble config.json": digest((folder / "config.json").read_bytes()), "members": members,
            "tokenizer vocabulary": digest(vocabulary), "path": str(folder)}


def check_same_ensemble(processes: Processes, description: dict) -> None:
    """Refuse to start (MismatchedEnsembleError, on every process) unless every process describes the same ensemble
    as rank 0: the same ensemble config, tokenizer vocabulary, and, for each member folder a process can read
    (a machine may hold only its own members), the same recorded checksums."""
    descriptions = processes.all_gather_object(description)
    reference = descriptions[0]
    problems = []
    for rank, other in enumerate(descriptions[1:], start=1):
        for key in ("ensemble config.json", "tokenizer vocabulary"):
            if other[key] != reference[key]:
                problems.append(f"rank {rank} ({other['path']}) has a different {key} from rank 0 "
                                f"({reference['path']})")
        for subfolder in other["members"].keys() & reference["members"].keys():
            if other["members"][subfolder] != reference["members"][subfolder]:
                problems.append(f"rank {rank}'s {subfolder} ({other['path']}) differs from rank 0's "
                                f"({reference['path']}): its checksums.json records other weights")
    if problems:
        raise MismatchedEnsembleError("the processes did not load the same ensemble: " + "; ".join(problems)
                                      + ". Point every process at copies of one saved ensemble")


# --- where the members run, as generate.py and score.py are told ----------------------------------------------

def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """Where the members run: all in this process (on one device, or one each with --member_devices), or spread
    over the processes a launcher started (--distributed). Used by generate.py and score.py."""
    parser.add_argument("--member_devices", default=None, metavar="DEV[,DEV...]",
                        help="one device per member (e.g. cuda:0,cuda:1): the members then run at once")
    parser.add_argument("--concurrent", action=argparse.BooleanOptionalAction, default=None,
                        help="run the members at once (threads) or one after another; default: at once when they "
                             "sit on several devices")
    parser.add_argument("--distributed", action="store_true",
                        help="this process holds a share of the members (launch with torchrun or srun)")
    parser.add_argument("--exchange", choices=EXCHANGES, default="full",
                        help="--distributed: send each process's whole vocabulary row (exact) or its top k")
    parser.add_argument("--exchange_k", type=int, default=64, help="--exchange topk: entries sent per position")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="--distributed: stop when another process has not answered for this long")


def placed_ensemble(folder: str | os.PathLike, args: argparse.Namespace, tokenizer, dtype: torch.dtype | None = None):
    """The saved ensemble in `folder` placed as `args` say (see add_placement_args): a ModelEnsemble, or this
    process's DistributedEnsemble once every process has checked it loaded the same ensemble."""
    load_kwargs = {} if dtype is None else {"dtype": dtype}
    if args.distributed:
        processes = start_processes(args.timeout)
        check_same_ensemble(processes, ensemble_description(folder, tokenizer))
        return DistributedEnsemble.from_pretrained(folder, processes, args.exchange, args.exchange_k, **load_kwargs)
    device_map = args.member_devices.split(",") if args.member_devices else None
    return ModelEnsemble.from_pretrained(folder, device_map=device_map, concurrent=args.concurrent, **load_kwargs)
