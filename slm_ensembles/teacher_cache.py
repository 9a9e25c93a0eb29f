"""A cache of the teacher's outputs at supervised positions, so that training never runs the teacher's body.

`build_teacher_cache.py` builds one from the command line (as a job of its own, before the runs that read it);
a run builds or reopens its own through `training_cache` and `evaluation_caches`.

A run uses a cache with `main.py --teacher_cache_dir DIR` when it was built for the run's teacher (the same
teacher and dtype), data and settings (mode, k, temperature, value dtype); otherwise the run refuses it, naming
the field.

The data is a folder written by preprocess_dataset.py. Two modes:

  topk    for every supervised position, the teacher's top-k log-probabilities at the training temperature T
          (log_softmax(logits / T)), their token ids, and the log of the rest of the vocabulary's (tail) mass,
          computed exactly in fp32 when the cache is built (a logsumexp, never 1 - sum of the top-k). Reading
          rescales the stored top-k so that it sums to exactly 1 - tail: the targets are a true distribution over
          k + 1 buckets (see `TeacherCache.topk_targets` and losses.sparse_divergence_sum). Bytes per position at
          k = 64 with uint8 values: 196 for a vocabulary of up to 65,536 tokens, one more per further block of
          65,536 (198 for Qwen's 151,936, 199 up to 262,144); float16 values (`--value_dtype float16`) take 62 more.
  hidden  the teacher's final hidden states (after its last norm) as float16; the trainer applies the teacher's
          output head to them (model_io.output_head), which reproduces its logits up to fp16 rounding, at any T.

The cache folder holds metadata.json (written last: a folder without it is not a finished cache) and one folder
per writing process, shard_00000/, ... Process `rank` of `world_size` caches the dataset rows i with
i % world_size == rank. A shard holds .npy files that are memory-mapped when read (P positions, V vocabulary):
    example_ids.npy      int64 [n_examples]       dataset row indices of this shard, ascending
    offsets.npy          int64 [n_examples + 1]   example j's positions are rows offsets[j]:offsets[j + 1]
    id_low_bits.npy      uint16 [P, k]            topk: the low 16 bits of the top-k token ids; a row's ids ascend
    id_block_starts.npy  uint8 [P, B - 1]         topk: with B = ceil(V / 65,536) blocks of 65,536 ids, column
                                                  j - 1 is how many of the row's ids lie below j * 65,536 (where
                                                  block j starts in the row): the ids' high bits, exactly. Columns
                                                  are uint16 (uint32) instead when k > 255 (65,535).
    values.npy           uint8/float16 [P, k]     topk: the log-probabilities, in the ids' order: uint8 codes of a
                                                  per-row affine quantization (code c is min + c * span / 255), or
                                                  float16 values
    value_spans.npy      float16 [P]              topk, uint8 only: each row's max - min log-probability. The row's
                                                  min is not stored: reading rescales the row to its known mass,
                                                  which removes any common offset
    tail_log_prob.npy    float16 [P]              topk: log of the mass outside the top-k (-inf when k = V)
    hidden.npy           float16 [P, H]           hidden: final hidden states
    shard.json           the settings the shard was built with, its example and position counts, and the size and
                         sha256 of each of its files, checked when a process first opens the cache

The cache is keyed by dataset row index, and a position's row is its rank in the row-major order of
losses.predictor_mask, example by example. So that the trainer knows which rows a batch holds, give the dataset an
`example_id` column (`with_example_ids`) and keep it through shuffling; fingerprint the split as prepared, before
adding that column, both when building and when opening the cache (`cache_identity`).

`TeacherCache.open` compares the settings the trainer expects (teacher fingerprint and dtype, tokenizer, dataset,
max length, mode, k, temperature, ...) with metadata.json and refuses any difference: a cache is never reused for
another setting.

A shard is built in pieces of PIECE_EXAMPLES examples, in a staging folder .shard_00000.partial/ whose arrays are
allocated whole at the start. A piece is published when its rows are flushed and the staging shard.json, rewritten
atomically, counts it; a build that is killed resumes at the first piece not counted, and a preemption signal
(SIGTERM, SIGUSR1) stops it between pieces with exit code 75. The finished staging folder is renamed into place.
While a process builds a shard it holds the lock .shard_00000.lock, so another run sharing the cache folder waits
for it (and takes over its staging folder if it dies) instead of building the same shard beside it.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import checksums
from model_io import IGNORE_INDEX, hidden_at, output_head
import preprocess_dataset
from slm_ensembles import files, processes
from slm_ensembles.losses import predictor_mask

FORMAT_VERSION = 3  # 3: shard.json records each file's size and sha256
MODES = ("topk", "hidden")
VALUE_DTYPES = ("uint8", "float16")
METADATA_FILE = "metadata.json"
SHARD_RECORD_FILE = "shard.json"
# The teacher's weight-file hashes, remembered next to the caches (see teacher_fingerprint).
FINGERPRINT_MEMO_FILE = "teacher_fingerprints.json"
QUANTIZATION_LEVELS = 255  # uint8 codes 0..255
# Log-probabilities (and the tail's log-mass) below this are stored as it: exp() of it is 0 in fp32 anyway, -inf
# would break quantization, and a finite tail keeps reverse KL finite.
LOG_PROB_FLOOR = -1e4
# Positions whose logits exist at once while the top-k is taken: bounds the memory of a large-vocabulary head.
HEAD_CHUNK_POSITIONS = 1024
ID_BLOCK = 1 << 16  # token ids are stored as their low 16 bits plus where each block of 65,536 ids starts in a row
HUB_SNAPSHOT = re.compile(r"[0-9a-f]{40}")  # a downloaded hub model lives in .../snapshots/<commit hash>/
# Examples of a shard built and published at once. At paper scale (a 7B teacher, 1,024 tokens, ~0.1 s an example on
# one GPU) a piece takes about two minutes: it finishes within the five minutes SLURM's warning signal leaves
# (train.sh), and a kill loses at most that much work.
PIECE_EXAMPLES = 1024
LOCK_POLL_SECONDS = 10  # how often a build waiting for another process's build of the same shard tries again
# The metadata fields that say which teacher, tokenizer and data a cache belongs to (see cache_identity).
IDENTITY_FIELDS = ("teacher", "teacher_fingerprint", "teacher_dtype", "tokenizer_hash", "dataset_fingerprint",
                   "max_length")


class CacheMismatchError(ValueError):
    """The cache was built for other settings than the ones it is opened for."""


class CacheCorruptError(CacheMismatchError):
    """A file of the cache no longer holds the bytes recorded when it was published (a disk or copy error, or an
    overwrite): a mismatch between the cache and itself, refused like one with the run's settings."""


class CacheIncompleteError(RuntimeError):
    """The cache folder is not a finished cache: metadata.json or some shards are missing or inconsistent."""


class BuildPreempted(Exception):
    """A preemption signal stopped a build between two pieces; the pieces published are kept for the next build."""


# ---------------------------------------------------------------------------------------------------------------------
# Identity of what is cached
# ---------------------------------------------------------------------------------------------------------------------

def teacher_fingerprint(path_or_name: str, memo_file: Path | None = None) -> str:
    """What identifies the teacher's weights: the commit of a downloaded hub snapshot (a folder .../snapshots/<40 hex
    digits>, whose files the hub never changes), otherwise sha256 over its config.json and the whole content of
    every .safetensors file, so that a change anywhere in the weights changes it.

    A hub name is resolved to its downloaded snapshot (never to the network). Hashing gigabytes takes a while, so each
    file's hash is remembered in `memo_file` (JSON; None: not remembered) under its resolved path, size and
    modification time, and computed again only when one of those changes.
    """
    folder = Path(path_or_name)
    if not folder.is_dir():
        folder = _downloaded_snapshot(path_or_name)
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and HUB_SNAPSHOT.fullmatch(folder.name):
        return f"hub-commit-{folder.name}"
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise ValueError(f"teacher {path_or_name!r}: no .safetensors files in {folder}, nothing to fingerprint")
    memo = _read_memo(memo_file)
    remembered = dict(memo)
    digest = hashlib.sha256()
    config_file = folder / "config.json"
    if config_file.is_file():
        digest.update(config_file.read_bytes())  # the config changes logits too (rope, soft-capping, scaling)
    for weight_file in weight_files:
        digest.update(weight_file.name.encode() + _file_sha256(weight_file, memo).encode())
    if memo_file is not None and memo != remembered:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomically(memo_file, json.dumps(memo, indent=2, sort_keys=True) + "\n")
    return digest.hexdigest()


def _downloaded_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ValueError(f"teacher {name!r} is neither a local folder nor a downloaded hub model: load it once "
                         "(from_pretrained) or pass its local folder") from error


def _read_memo(memo_file: Path | None) -> dict:
    if memo_file is None or not memo_file.is_file():
        return {}
    try:
        return json.loads(memo_file.read_text())
    except json.JSONDecodeError:
        return {}  # it only saves time: an unreadable memo means hashing again, and it is rewritten whole


def _file_sha256(path: Path, memo: dict) -> str:
    """sha256 of the file's content, from `memo` when the file has the size and mtime it had when hashed there;
    otherwise computed and added to `memo`."""
    stat = path.stat()
    key = str(path.resolve())
    remembered = memo.get(key)
    if remembered and (remembered["size"], remembered["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
        return remembered["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return memo[key]["sha256"]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how metadata.json records the dtype the teacher was run in."""
    return str(dtype).removeprefix("torch.")


def cache_identity(teacher_path: str, tokenizer, dataset, max_length: int, teacher_dtype: torch.dtype,
                   fingerprint_memo: Path | None = None) -> dict:
    """The metadata fields that say which teacher (weights and the dtype it runs in), tokenizer and data a cache
    belongs to.

    `dataset` is the split as prepared, before `with_example_ids` (adding a column changes the fingerprint);
    `fingerprint_memo` is where the teacher's weight hashes are remembered (see `teacher_fingerprint`).
    """
    return {
        "teacher": str(teacher_path),
        "teacher_fingerprint": teacher_fingerprint(teacher_path, fingerprint_memo),
        "teacher_dtype": dtype_name(teacher_dtype),
        "tokenizer_hash": preprocess_dataset.tokenizer_sha256(tokenizer),
        "dataset_fingerprint": dataset._fingerprint,
        "max_length": max_length,
    }


def identity_for_split(metadata: dict, dataset) -> dict:
    """The identity fields of `metadata` (a cache's, or cache_identity's) for another split of the same prepared
    data, `dataset` (before with_example_ids): the same teacher, tokenizer and max length, without hashing any of
    them again; only the dataset fingerprint differs."""
    return {**{field: metadata[field] for field in IDENTITY_FIELDS}, "dataset_fingerprint": dataset._fingerprint}


def with_example_ids(dataset):
    """The dataset with an `example_id` column holding each row's index: the key the cache is read with."""
    return dataset.add_column("example_id", list(range(len(dataset))))


# ---------------------------------------------------------------------------------------------------------------------
# The top-k encoding: ids as low bits plus block starts, values quantized, the tail's exact log-mass
# ---------------------------------------------------------------------------------------------------------------------

def top_k_with_tail(logits: torch.Tensor, k: int, temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k of log_softmax(logits / T) [n, k] fp32 and their token ids [n, k], both in ascending id order, and
    the log of the remaining mass [n] (-inf when k is the whole vocabulary).

    The tail is a logsumexp over the other entries in fp32: exact however peaked the teacher is, where 1 - (top-k
    mass) would cancel to a few significant bits, or to nothing.
    """
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    ids = log_probs.topk(k, dim=-1).indices.sort(dim=-1).values
    top_log_probs = log_probs.gather(-1, ids).clamp(min=LOG_PROB_FLOOR)
    if k == logits.shape[-1]:
        return top_log_probs, ids, torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
    tail = log_probs.scatter_(-1, ids, float("-inf")).logsumexp(dim=-1)
    return top_log_probs, ids, tail.clamp(min=LOG_PROB_FLOOR)


def num_id_blocks(vocab_size: int) -> int:
    """How many blocks of 65,536 token ids the vocabulary spans."""
    return -(-vocab_size // ID_BLOCK)


def block_start_dtype(k: int) -> np.dtype:
    """The narrowest unsigned type that holds a block start, 0..k (uint8 up to k = 255)."""
    return np.min_scalar_type(k)


def encode_token_ids(ids: torch.Tensor, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n, k], ascending within each row, as their low 16 bits (uint16 [n, k]) and, for each block
    j = 1..B-1 of 65,536 ids, the column where it starts in the row ([n, B - 1]): how many ids lie below j * 65,536."""
    ids = ids.cpu().long()
    low_bits = (ids % ID_BLOCK).numpy().astype(np.uint16)
    block_firsts = torch.arange(1, num_id_blocks(vocab_size), dtype=torch.long) * ID_BLOCK
    starts = (ids.unsqueeze(1) < block_firsts[None, :, None]).sum(dim=-1)
    return low_bits, starts.numpy().astype(block_start_dtype(ids.shape[-1]))


def decode_token_ids(low_bits: np.ndarray, block_starts: np.ndarray) -> torch.Tensor:
    """The int64 token ids [n, k] that `encode_token_ids` encoded."""
    low_bits = torch.from_numpy(np.asarray(low_bits, dtype=np.int64))
    block_starts = torch.from_numpy(np.asarray(block_starts, dtype=np.int64))
    columns = torch.arange(low_bits.shape[-1])
    # A column's block is the number of blocks after the first that have started at or before it (ids ascend).
    blocks = (columns[None, None, :] >= block_starts[:, :, None]).sum(dim=1)
    return low_bits + blocks * ID_BLOCK


def quantize_log_probs(log_probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """uint8 codes [n, k] and each row's float16 span [n]: value = row min + code * span / 255.

    The span is rounded up to float16 before the codes are computed, so every value dequantizes within half a step
    of itself. The row's min is not kept: `normalised_top_k` removes any offset common to a row.
    """
    low = log_probs.min(dim=-1, keepdim=True).values
    span = _float16_up((log_probs.max(dim=-1).values - low.squeeze(-1)).numpy())
    step = torch.from_numpy(span.astype(np.float32)).unsqueeze(-1) / QUANTIZATION_LEVELS
    scaled = torch.where(step > 0, (log_probs - low) / step.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    codes = scaled.round().clamp(0, QUANTIZATION_LEVELS).to(torch.uint8)
    return codes.numpy(), span


def _float16_up(values: np.ndarray) -> np.ndarray:
    """`values` as float16, rounded up where float16 cannot hold them exactly."""
    rounded = values.astype(np.float16)
    return np.where(rounded < values, np.nextafter(rounded, np.float16(np.inf)), rounded)


def dequantize_log_probs(codes: np.ndarray, spans: np.ndarray) -> torch.Tensor:
    """The fp32 log-probabilities [n, k] that `quantize_log_probs` encoded, less each row's min."""
    steps = torch.from_numpy(np.asarray(spans, dtype=np.float32)).unsqueeze(-1) / QUANTIZATION_LEVELS
    return torch.from_numpy(np.asarray(codes, dtype=np.float32)) * steps


def normalised_top_k(log_probs: torch.Tensor, tail_log_prob: torch.Tensor) -> torch.Tensor:
    """Top-k log-probabilities [n, k], known up to an offset per row, shifted so that their mass is exactly
    1 - exp(tail_log_prob) [n] (all of it when the tail is -inf: the top-k is the whole vocabulary)."""
    top_log_mass = torch.log1p(-tail_log_prob.exp())
    return log_probs - log_probs.logsumexp(dim=-1, keepdim=True) + top_log_mass.unsqueeze(-1)


def encode_top_k(log_probs: torch.Tensor, ids: torch.Tensor, tail_log_prob: torch.Tensor, vocab_size: int,
                 value_dtype: str) -> dict[str, np.ndarray]:
    """`top_k_with_tail`'s output as the arrays of a shard's rows (see the module docstring)."""
    log_probs = log_probs.cpu()
    rows = dict(zip(("id_low_bits", "id_block_starts"), encode_token_ids(ids, vocab_size)))
    if value_dtype == "float16":
        rows["values"] = log_probs.numpy().astype(np.float16)
    else:
        rows["values"], rows["value_spans"] = quantize_log_probs(log_probs)
    rows["tail_log_prob"] = tail_log_prob.cpu().numpy().astype(np.float16)
    return rows


def decode_top_k(rows: dict[str, np.ndarray], value_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-probabilities [n, k] fp32 (normalised to 1 - tail), token ids [n, k] int64 and tail log-mass [n] fp32
    that `encode_top_k` encoded into `rows`."""
    ids = decode_token_ids(rows["id_low_bits"], rows["id_block_starts"])
    if value_dtype == "uint8":
        log_probs = dequantize_log_probs(rows["values"], rows["value_spans"])
    else:
        log_probs = torch.from_numpy(np.asarray(rows["values"], dtype=np.float32))
    tail_log_prob = torch.from_numpy(np.asarray(rows["tail_log_prob"], dtype=np.float32))
    return normalised_top_k(log_probs, tail_log_prob), ids, tail_log_prob


def array_layout(settings: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each per-position array of a shard built with `settings`: its dtype and the shape of one position's row."""
    if settings["mode"] == "hidden":
        return {"hidden": (np.dtype(np.float16), (settings["hidden_size"],))}
    k = settings["k"]
    layout = {"id_low_bits": (np.dtype(np.uint16), (k,)),
              "id_block_starts": (block_start_dtype(k), (num_id_blocks(settings["vocab_size"]) - 1,)),
              "values": (np.dtype(settings["value_dtype"]), (k,))}
    if settings["value_dtype"] == "uint8":
        layout["value_spans"] = (np.dtype(np.float16), ())
    layout["tail_log_prob"] = (np.dtype(np.float16), ())
    return layout


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------

def build_cache(teacher, dataset, cache_dir, *, mode: str, k: int, temperature: float, vocab_size: int,
                batch_size: int, collator, metadata: dict, rank: int = 0, world_size: int = 1,
                value_dtype: str = "uint8", piece_examples: int = PIECE_EXAMPLES,
                preemption: "processes.PreemptionSignal | None" = None) -> Path:
    """Run the teacher (eval, no grad) over this rank's rows of `dataset` and write shard_{rank:05d}; return it.

    `metadata` holds the identity fields (see `cache_identity`); the cache's own settings (mode, k, temperature,
    value_dtype, vocab_size, hidden_size, teacher_dtype, num_examples, world_size) are added here. In hidden mode k
    and the temperature do not apply and are recorded as null. After every rank's shard exists, call
    `write_metadata` once to finish the cache. A stale metadata.json is removed before a shard is (re)built, so a
    cache being rebuilt cannot be opened.

    The shard is built in pieces of `piece_examples` examples (see the module docstring): a shard already published
    for the same settings is kept, a killed build is continued at its first missing piece, and `preemption` (checked
    by every process at the same points: before each piece) raises BuildPreempted between two pieces. Too little
    free disk for what is left to write raises files.DiskSpaceError before anything is written.
    """
    settings = _shard_settings(teacher, dataset, mode=mode, k=k, temperature=temperature, vocab_size=vocab_size,
                               metadata=metadata, world_size=world_size, value_dtype=value_dtype)
    _check_example_ids(dataset)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    example_ids = np.arange(rank, len(dataset), world_size, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(_supervised_position_counts(dataset, example_ids))]).astype(np.int64)
    plan = {"rank": rank, "settings": settings, "num_examples": len(example_ids), "num_positions": int(offsets[-1]),
            "piece_examples": piece_examples}
    # As many pieces as the largest shard (rank 0's) has, on every process: they check for a preemption together.
    num_pieces = -(-len(range(0, len(dataset), world_size)) // piece_examples)
    shard_dir, staging = cache_dir / shard_name(rank), cache_dir / f".{shard_name(rank)}.partial"
    with _shard_lock(cache_dir / f".{shard_name(rank)}.lock", preemption, teacher.device):
        published = _plan(_read_record(shard_dir)) == plan
        done = num_pieces if published else _resumable_pieces(cache_dir, staging, plan)
        positions_left = int(offsets[-1] - offsets[min(done * piece_examples, len(example_ids))])
        index_bytes = 0 if done else example_ids.nbytes + offsets.nbytes  # written as the build starts
        _check_disk(cache_dir, payload_bytes(settings, positions_left) + index_bytes, teacher.device)
        if not published:
            (cache_dir / METADATA_FILE).unlink(missing_ok=True)
            if not done:
                _new_staging(staging, plan, example_ids, offsets)
            elif done < num_pieces:
                print(f"{cache_dir}: continuing {shard_name(rank)} at piece {done + 1} of {num_pieces}")
        for piece in range(num_pieces):
            if preemption is not None and preemption.received_anywhere(teacher.device):
                raise BuildPreempted(f"{cache_dir}: preempted with {max(done, piece)} of {num_pieces} pieces of "
                                     f"{shard_name(rank)} built, which are kept: run the same command again to "
                                     "continue the build")
            if piece >= done:
                start, end = (min(bound * piece_examples, len(example_ids)) for bound in (piece, piece + 1))
                _build_piece(teacher, dataset, staging, settings, example_ids[start:end], offsets[start:end + 1],
                             batch_size, collator)
                files.write_atomically(staging / SHARD_RECORD_FILE,
                                           json.dumps({**plan, "pieces_done": piece + 1}, indent=2) + "\n")
        return shard_dir if published else _publish(staging, shard_dir, plan)


@contextlib.contextmanager
def _shard_lock(path: Path, preemption: "processes.PreemptionSignal | None", device):
    """Hold the lock file `path` while this process builds the shard it guards; while another process holds it (a
    run sharing the cache folder), wait. The processes of a job take their shards' locks together, all or none, so
    that they stay in step (every call here is collective) and two jobs never each hold half.

    A held lock is a live build, and a free one means any staging folder left is a dead build's (files.try_lock).
    """
    waiting = False
    while True:
        fd = files.try_lock(path)
        if not processes.any_process(fd is None, device):
            break
        if fd is not None:
            os.close(fd)
        if preemption is not None and preemption.received_anywhere(device):
            raise BuildPreempted(f"{path.parent}: preempted while waiting for another build of this cache")
        if not waiting:
            print(f"{path.parent}: another process is building this cache (it holds {path.name}); waiting for it")
        waiting = True
        time.sleep(LOCK_POLL_SECONDS)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # removed while held: see files.try_lock
        os.close(fd)


def _sum_over_processes(value: int, device) -> int:
    """`value` summed over the process group's processes (each calls this at the same point), or `value` itself
    where there is no group. The group's own all-reduce, so any launcher's group sums (accelerate's `reduce` would
    sum only under an accelerate state that knows of the group)."""
    if not torch.distributed.is_initialized():
        return value
    total = torch.tensor(value, device=device)
    torch.distributed.all_reduce(total)  # a sum: all_reduce's default operation
    return int(total.item())


def payload_bytes(settings: dict, num_positions: int) -> int:
    """What `num_positions` rows of the per-position arrays of a shard built with `settings` take on disk."""
    return num_positions * sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in array_layout(settings).values())


def cache_bytes_per_position(teacher_mode: str, *, vocab_size: int, hidden_size: int, k: int,
                             value_dtype: str) -> int:
    """Bytes one supervised position takes in a teacher cache: its row of each per-position array that
    array_layout lists. topk: k token ids (16 low bits each, plus a byte per further block of 65,536 ids), k values
    (uint8 with a float16 span per row, or float16) and the float16 tail log-mass; hidden: hidden_size float16
    values."""
    if teacher_mode not in MODES:
        raise ValueError(f"teacher_mode {teacher_mode!r} has no cache: use one of {MODES}")
    settings = {"mode": teacher_mode, "k": k, "vocab_size": vocab_size, "value_dtype": value_dtype,
                "hidden_size": hidden_size}
    return payload_bytes(settings, 1)


def _check_disk(cache_dir: Path, needed: int, device) -> None:
    """Refuse (files.DiskSpaceError) a build whose processes together need more than the free disk: they share
    the cache folder, since each of them reads every shard."""
    files.check_disk_space(cache_dir, _sum_over_processes(needed, device),
                               "the teacher cache's pieces still to be written",
                               "free some space, or build the cache on a larger disk (teacher_cache.py "
                               "--output_dir) and point teacher_cache_dir at it")


def _read_record(folder: Path) -> dict | None:
    """The shard.json of a shard or of a staging folder, if it has one."""
    path = folder / SHARD_RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _plan(record: dict | None) -> dict | None:
    """What a shard record says was (or is being) built, without how far the build got or its files' checksums."""
    return None if record is None else {key: value for key, value in record.items()
                                        if key not in ("pieces_done", "files")}


def _resumable_pieces(cache_dir: Path, staging: Path, plan: dict) -> int:
    """How many pieces of `plan` the staging folder a dead build left holds (0 when there is none). Called with the
    shard's lock held, so every staging folder of the shard is a dead build's: any other (for another plan, with no
    piece done, or a .partial-* of an older version) is removed."""
    done = 0
    for leftover in cache_dir.glob(f"{staging.name}*"):
        record = _read_record(leftover)
        if leftover == staging and _plan(record) == plan and record["pieces_done"]:
            done = record["pieces_done"]
        else:
            shutil.rmtree(leftover)
    return done


def _new_staging(staging: Path, plan: dict, example_ids: np.ndarray, offsets: np.ndarray) -> None:
    """The staging folder of a shard: its example ids and offsets, its arrays allocated whole (sparse files, filled
    piece by piece), and last its record with no piece done: a folder without one is never continued."""
    staging.mkdir()
    np.save(staging / "example_ids.npy", example_ids)
    np.save(staging / "offsets.npy", offsets)
    for name, (dtype, shape) in array_layout(plan["settings"]).items():  # created here, filled by ShardWriter
        np.lib.format.open_memmap(staging / f"{name}.npy", "w+", dtype, (plan["num_positions"], *shape))
    files.write_atomically(staging / SHARD_RECORD_FILE, json.dumps({**plan, "pieces_done": 0}, indent=2) + "\n")


def _build_piece(teacher, dataset, staging: Path, settings: dict, example_ids: np.ndarray, offsets: np.ndarray,
                 batch_size: int, collator) -> None:
    """The teacher's rows for `example_ids` (whose positions start at offsets[0]), written into the staging folder's
    arrays and flushed to its files."""
    writer = ShardWriter(staging, settings, int(offsets[0]))
    _run_teacher(teacher, dataset, example_ids, offsets, batch_size, collator, writer)
    writer.close()


def _run_teacher(teacher, dataset, example_ids: np.ndarray, offsets: np.ndarray, batch_size: int, collator,
                 writer: "ShardWriter") -> None:
    """Pass the examples through the teacher's body in batches; the writer turns hidden states into rows."""
    teacher.eval()
    with torch.no_grad():
        for start in range(0, len(example_ids), batch_size):
            batch_ids = example_ids[start:start + batch_size]
            batch = collator([dataset[int(i)] for i in batch_ids])
            positions = predictor_mask(batch["labels"])
            hidden = hidden_at(teacher, batch["input_ids"], batch["attention_mask"], positions)
            writer.write(teacher, hidden, expected_end=int(offsets[start + len(batch_ids)]))


def _shard_settings(teacher, dataset, *, mode: str, k: int, temperature: float, vocab_size: int, metadata: dict,
                    world_size: int, value_dtype: str) -> dict:
    """The full settings a shard is built with: the caller's identity fields plus the cache's own."""
    if mode not in MODES:
        raise ValueError(f"unknown cache mode {mode!r}: use one of {MODES}")
    if mode == "topk" and not 1 <= k <= vocab_size:
        raise ValueError(f"k = {k} must be between 1 and the vocabulary size {vocab_size}")
    if mode == "topk" and value_dtype not in VALUE_DTYPES:
        raise ValueError(f"unknown value_dtype {value_dtype!r}: use one of {VALUE_DTYPES}")
    own = {
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "k": k if mode == "topk" else None,
        "temperature": float(temperature) if mode == "topk" else None,
        "value_dtype": value_dtype if mode == "topk" else "float16",
        "vocab_size": vocab_size,
        "hidden_size": teacher.get_output_embeddings().weight.shape[1],
        "teacher_dtype": dtype_name(teacher.dtype),  # what the teacher is run in here, whatever metadata says
        "num_examples": len(dataset),
        "world_size": world_size,
    }
    conflicting = sorted(key for key in own if key in metadata and metadata[key] != own[key])
    if conflicting:
        raise ValueError("metadata " + ", ".join(f"{key} = {metadata[key]!r}" for key in conflicting)
                         + " contradict the teacher and arguments build_cache is given ("
                         + ", ".join(f"{key} = {own[key]!r}" for key in conflicting) + ")")
    return {**metadata, **own}


def _check_example_ids(dataset) -> None:
    """Refuse an `example_id` column that is not the row index: the cache would be read for the wrong rows."""
    if "example_id" in dataset.column_names and not np.array_equal(np.asarray(dataset["example_id"]),
                                                                    np.arange(len(dataset))):
        raise ValueError("the dataset's example_id column is not its row index (was it shuffled or selected after "
                         "with_example_ids?); cache the prepared split itself")


def _supervised_position_counts(dataset, example_ids: np.ndarray) -> np.ndarray:
    """How many positions of each example predict a supervised token (its True entries in predictor_mask)."""
    labels = dataset.select(example_ids).with_format("numpy")["labels"]
    return np.array([np.count_nonzero(row[1:] != IGNORE_INDEX) for row in labels], dtype=np.int64)


def shard_name(rank: int) -> str:
    return f"shard_{rank:05d}"


def _publish(staging: Path, shard_dir: Path, plan: dict) -> Path:
    """Record the size and sha256 of each file of the finished staging folder in its shard.json, and move it into
    place (a rename: readers never see half a shard); a shard another process finished first for the same plan is
    kept."""
    file_records = {path.name: checksums.file_record(path) for path in sorted(staging.glob("*.npy"))}
    record = {**_read_record(staging), "files": file_records}
    files.write_atomically(staging / SHARD_RECORD_FILE, json.dumps(record, indent=2) + "\n")
    files.publish_folder(staging, shard_dir, lambda folder: _plan(_read_record(folder)) == plan)
    return shard_dir


class ShardWriter:
    """Fills a staging folder's preallocated, memory-mapped arrays batch by batch with the teacher's outputs, from
    row `cursor` on."""

    def __init__(self, folder: Path, settings: dict, cursor: int):
        self.settings = settings
        self.cursor = cursor
        self.arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", "r+")
                       for name in array_layout(settings)}

    def write(self, teacher, hidden: torch.Tensor, expected_end: int) -> None:
        """Append one batch's rows, computed from the teacher's final hidden states [n, H] at its positions."""
        end = self.cursor + hidden.shape[0]
        if end != expected_end:
            raise RuntimeError(f"the collated batch has {hidden.shape[0]} supervised positions, the examples' labels "
                               f"{expected_end - self.cursor}: the collator must keep every label (no truncation)")
        rows = self._rows(teacher, hidden)
        for name, array in rows.items():
            self.arrays[name][self.cursor:end] = array
        self.cursor = end

    def _rows(self, teacher, hidden: torch.Tensor) -> dict[str, np.ndarray]:
        if self.settings["mode"] == "hidden":
            return {"hidden": _to_float16(hidden)}
        top_k = teacher_top_k(teacher, hidden, self.settings["k"], self.settings["temperature"],
                              self.settings["vocab_size"])
        return encode_top_k(*top_k, self.settings["vocab_size"], self.settings["value_dtype"])

    def close(self) -> None:
        """Flush the rows written to the files (msync): a piece is counted only once they are there."""
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()


def _to_float16(hidden: torch.Tensor) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow is refused just below, with what to do instead
        values = hidden.float().cpu().numpy().astype(np.float16)
    if not np.isfinite(values).all():
        raise ValueError("the teacher's hidden states overflow float16; use the topk mode for this teacher")
    return values


def teacher_top_k(teacher, hidden: torch.Tensor, k: int, temperature: float,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`top_k_with_tail` of the teacher's logits at its final hidden states [n, H], chunk by chunk."""
    head = output_head(teacher, vocab_size)
    chunks = [top_k_with_tail(head(hidden[start:start + HEAD_CHUNK_POSITIONS]), k, temperature)
              for start in range(0, hidden.shape[0], HEAD_CHUNK_POSITIONS)]
    if not chunks:
        return (torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.long), torch.zeros(0))
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def write_metadata(cache_dir, metadata: dict) -> None:
    """Finish the cache: check that every shard exists and was built with the same settings, write metadata.json.

    `metadata` is what was passed to `build_cache` (or any subset of the shards' settings); each of its fields must
    agree with the shards'. Written last and atomically (files.write_atomically: fsync, then rename): a folder
    with metadata.json is a complete cache.
    """
    cache_dir = Path(cache_dir)
    records = _shard_records(cache_dir)
    if not records:
        raise CacheIncompleteError(f"{cache_dir}: no finished shard; run build_cache for every rank first")
    settings = next(iter(records.values()))["settings"]
    _check_shards(cache_dir, settings, records)
    check_expected(settings, metadata, cache_dir)
    complete = {**settings, "num_positions": sum(record["num_positions"] for record in records.values())}
    files.write_atomically(cache_dir / METADATA_FILE, json.dumps(complete, indent=2) + "\n")


def cache_settings(mode: str, vocab_size: int, k: int, temperature: float, value_dtype: str) -> dict:
    """The settings a cache is built with, as metadata.json records them: k, temperature and the value dtype only
    apply to top-k caches (hidden ones are exact at any temperature)."""
    settings = {"mode": mode, "vocab_size": vocab_size}
    if mode == "topk":
        settings.update(k=k, temperature=temperature, value_dtype=value_dtype)
    return settings


def cache_folder(root: Path, identity: dict, settings: dict) -> Path:
    """The folder under `root` of the cache with this identity (cache_identity) and these settings
    (cache_settings): named by their hash, so that every run with the same teacher, data and settings shares it,
    and a new format version gets a new folder."""
    key_fields = {**identity, **settings, "format_version": FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"{settings['mode']}-{key}"


def open_or_build(cache_dir, load_teacher, dataset, identity: dict, settings: dict, *, batch_size: int, collator,
                  state, preemption: "processes.PreemptionSignal | None" = None) -> "TeacherCache":
    """The cache in `cache_dir` of the teacher's outputs on `dataset` (the split as prepared, without example
    ids), whose identity is `identity` (cache_identity), in `settings` (cache_settings): opened when it is
    complete and built for them; otherwise built (or its build continued) by every process of `state` (one shard
    each), finished by the main process, and opened. `load_teacher()` returns the whole teacher on this process's
    device; it is called only for a build, so a finished cache never loads the teacher's weights. A finished cache
    built for anything else is refused (CacheMismatchError names the field), never overwritten. A signal
    `preemption` records stops the build between two pieces (BuildPreempted)."""
    cache_dir = Path(cache_dir)
    expected = {**identity, **settings}
    try:
        return TeacherCache.open(cache_dir, expected)
    except CacheIncompleteError:
        print(f"building the teacher cache ({settings['mode']}) in {cache_dir}")
    build_cache(load_teacher(), with_example_ids(dataset), cache_dir, mode=settings["mode"], k=settings.get("k"),
                temperature=settings.get("temperature"), vocab_size=settings["vocab_size"], batch_size=batch_size,
                collator=collator, metadata=identity, rank=state.process_index, world_size=state.num_processes,
                value_dtype=settings.get("value_dtype"), piece_examples=PIECE_EXAMPLES,  # None: hidden, in float16
                preemption=preemption)
    state.wait_for_everyone()
    if state.is_main_process:
        write_metadata(cache_dir, identity)
    state.wait_for_everyone()
    return TeacherCache.open(cache_dir, expected)


def training_cache(config, load_teacher, teacher_dtype: torch.dtype, teacher_path: str, tokenizer, split, collator,
                   state, preemption: "processes.PreemptionSignal | None" = None) -> "TeacherCache | None":
    """A run's cache of the teacher's outputs on its training split `split` in the config's teacher_mode (None for
    the online teacher), built once and shared by every round and every run with the same teacher, data and
    settings: in cache_dir/teacher_cache, or in the folder teacher_cache_dir names (one teacher_cache.py built in
    another job, say), which must hold a cache of this run's teacher, data and settings or none yet. `preemption`
    stops a build between two pieces (BuildPreempted). `load_teacher()` gives the whole teacher (in
    `teacher_dtype`) for a build; an existing cache needs none of its weights."""
    if config.teacher_mode == "online":
        return None
    with state.main_process_first():  # one process hashes the teacher's weights, the others read its memo
        identity = cache_identity(teacher_path, tokenizer, split, config.max_length, teacher_dtype,
                                  Path(config.cache_dir) / FINGERPRINT_MEMO_FILE)
    return _run_cache(config, load_teacher, identity, len(tokenizer), split, collator, state, config.teacher_mode,
                      "teacher_cache", config.teacher_cache_dir, preemption)


def evaluation_caches(config, load_teacher, train_cache: "TeacherCache", splits: dict, collator,
                      state) -> tuple["TeacherCache", ...]:
    """The teacher's final hidden states on each of `splits` (the held-out ones: test, weight_fit), cached once in
    cache_dir/teacher_eval_cache, so that evaluating a run never runs the teacher's body. They share the training
    cache's identity, each with its split's fingerprint, so nothing is hashed again."""
    return tuple(_run_cache(config, load_teacher, identity_for_split(train_cache.metadata, split),
                            train_cache.metadata["vocab_size"], split, collator, state, "hidden", "teacher_eval_cache")
                 for split in splits.values())


def _run_cache(config, load_teacher, identity: dict, vocab_size: int, split, collator, state, mode: str, root: str,
               folder: str | None = None, preemption: "processes.PreemptionSignal | None" = None) -> "TeacherCache":
    """The cache of `split` in `mode`: in `folder` when one is given, else in the folder of cache_dir/`root` that
    its identity and settings name."""
    settings = cache_settings(mode, vocab_size, config.cache_k, config.temperature, config.cache_value_dtype)
    folder = Path(folder) if folder else cache_folder(Path(config.cache_dir) / root, identity, settings)
    return open_or_build(folder, load_teacher, split, identity, settings, batch_size=config.eval_batch_size,
                         collator=collator, state=state, preemption=preemption)


def _shard_records(cache_dir: Path) -> dict[int, dict]:
    """Each finished shard's shard.json, by rank (staging folders of unfinished shards are not listed)."""
    records = {}
    for record_file in sorted(cache_dir.glob(f"shard_*/{SHARD_RECORD_FILE}")):
        record = json.loads(record_file.read_text())
        records[record["rank"]] = record
    return records


def _check_shards(cache_dir: Path, settings: dict, records: dict[int, dict]) -> None:
    """Refuse missing shards and shards built with other settings than `settings`."""
    missing = [shard_name(rank) for rank in range(settings["world_size"]) if rank not in records]
    if missing:
        raise CacheIncompleteError(f"{cache_dir}: incomplete cache, missing {', '.join(missing)} of "
                                   f"{settings['world_size']} shards; build them (rank/world_size) or rebuild it")
    for rank, record in sorted(records.items()):
        differing = sorted(key for key in settings.keys() | record["settings"].keys()
                           if record["settings"].get(key) != settings.get(key))
        if differing:
            raise CacheIncompleteError(
                f"{cache_dir}: {shard_name(rank)} was built with other settings ("
                + ", ".join(f"{key}: {record['settings'].get(key)!r} instead of {settings.get(key)!r}"
                            for key in differing) + "); rebuild the cache")


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------

class TeacherCache:
    """A finished cache, memory-mapped: targets for any examples, by dataset row index."""

    def __init__(self, cache_dir: Path, metadata: dict, shards: list[dict[str, np.ndarray]]):
        self.cache_dir = cache_dir
        self.metadata = metadata
        self.shards = shards  # per rank: example_ids, offsets and the mode's arrays, all np.memmap

    @classmethod
    def open(cls, cache_dir, expected: dict) -> "TeacherCache":
        """Open the cache in `cache_dir` if it is complete and built for `expected`'s settings.

        Every field of `expected` (e.g. cache_identity(...) plus mode, k, temperature, value_dtype, vocab_size) must
        equal the cached one, else CacheMismatchError names it. Hidden-mode caches hold no k or temperature (null):
        leave those out of `expected` for them.
        """
        cache_dir = Path(cache_dir)
        metadata = _read_metadata(cache_dir)
        check_expected(metadata, {"format_version": FORMAT_VERSION, **expected}, cache_dir)
        settings = {key: value for key, value in metadata.items() if key != "num_positions"}
        records = _shard_records(cache_dir)
        _check_shards(cache_dir, settings, records)
        shards = [_map_shard(cache_dir / shard_name(rank), metadata) for rank in range(metadata["world_size"])]
        for rank in range(metadata["world_size"]):
            _verify_once(cache_dir / shard_name(rank), records[rank]["files"])
        return cls(cache_dir, metadata, shards)

    @property
    def mode(self) -> str:
        return self.metadata["mode"]

    def topk_targets(self, example_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's (k + 1)-bucket targets at the examples' supervised positions, at the cached temperature.

        Returns log_probs [N, k] fp32 (top-k log-probabilities, in ascending token id order), indices [N, k] int64
        (their token ids) and tail_log_prob [N] fp32 (log of the mass of every other token, as computed when the
        cache was built), with N the examples' supervised positions in the order given, position by position within
        each example: the rows of predictor_mask for a batch of these examples. The top-k is rescaled so that each
        row's exp(log_probs).sum() is exactly 1 - exp(tail_log_prob); the tail is -inf when k = vocabulary.
        """
        self._require_mode("topk")
        ranges = self._position_ranges(example_ids)
        rows = {name: self._gather(name, ranges) for name in array_layout(self.metadata)}
        return decode_top_k(rows, self.metadata["value_dtype"])

    def hidden_states(self, example_ids: list[int]) -> torch.Tensor:
        """The teacher's final hidden states [N, H] fp32 at the examples' supervised positions (order: topk_targets).

        Logits: model_io.output_head(teacher, vocab_size)(hidden_states).
        """
        self._require_mode("hidden")
        hidden = self._gather("hidden", self._position_ranges(example_ids))
        return torch.from_numpy(hidden.astype(np.float32))

    def check_positions(self, rows: int, example_ids: list[int], expected: int) -> None:
        """Refuse `rows` cached positions read for a batch of the examples `example_ids` whose labels supervise
        `expected` positions: the cache was built for other data (another tokenization or max length)."""
        if rows != expected:
            raise ValueError(f"{self.cache_dir}: the teacher cache holds {rows} positions for examples {example_ids} "
                             f"but the batch has {expected} supervised positions: the cache was built for other "
                             "data; rebuild it")

    def _require_mode(self, mode: str) -> None:
        if self.mode != mode:
            raise ValueError(f"{self.cache_dir} is a {self.mode!r} cache, not a {mode!r} one")

    def _position_ranges(self, example_ids: list[int]) -> list[tuple[dict[str, np.ndarray], int, int]]:
        """Each example's shard and rows [start, end) there, in the order of `example_ids`."""
        ranges = []
        for example_id in example_ids:
            shard = self.shards[int(example_id) % len(self.shards)]
            ranges.append((shard, *_position_range(shard, int(example_id), self.metadata["num_examples"])))
        return ranges

    def _gather(self, name: str, ranges: list[tuple[dict[str, np.ndarray], int, int]]) -> np.ndarray:
        """The rows of array `name` for the examples' positions, concatenated in order."""
        if not ranges:
            return np.asarray(self.shards[0][name][:0])
        return np.concatenate([shard[name][start:end] for shard, start, end in ranges])


def _read_metadata(cache_dir: Path) -> dict:
    path = cache_dir / METADATA_FILE
    if not path.is_file():
        raise CacheIncompleteError(f"{cache_dir}: no {METADATA_FILE}, so the cache was never finished (or is being "
                                   "rebuilt); build every shard, then write_metadata, or run teacher_cache.py")
    return json.loads(path.read_text())


def check_expected(metadata: dict, expected: dict, cache_dir: Path) -> None:
    """Raise CacheMismatchError naming the first field whose cached value differs from the expected one."""
    for field, wanted in expected.items():
        cached = metadata.get(field)
        if cached != wanted:
            raise CacheMismatchError(f"{cache_dir}: the teacher cache was built with {field} = {cached!r}, but this "
                                     f"run wants {field} = {wanted!r}; point teacher_cache_dir at a cache built for "
                                     "this run's settings, or rebuild this one for them (delete the folder, then run "
                                     "again or build it with teacher_cache.py)")


# The shards this process has checked against their checksums, as (folder, the files' records): each once.
_VERIFIED: set[tuple[str, str]] = set()


def _verify_once(shard_dir: Path, file_records: dict[str, dict]) -> None:
    """Refuse (CacheCorruptError, naming the file) a shard file whose size or sha256 is not what was recorded when
    the shard was published; a shard is read in full once per process (and again if it is rebuilt), so that a disk
    or copy error, or an overwrite, is never trained on silently."""
    key = (str(shard_dir.resolve()), json.dumps(file_records, sort_keys=True))
    if key in _VERIFIED:
        return
    for name, recorded in file_records.items():
        problem = checksums.file_damage(shard_dir / name, recorded)
        if problem is not None:
            raise CacheCorruptError(
                f"{problem}: the file changed since (a disk or copy error, or an overwrite). Nothing was read from "
                f"it; delete {shard_dir.parent} to rebuild the cache, or point teacher_cache_dir at an intact copy")
    _VERIFIED.add(key)


def _map_shard(shard_dir: Path, metadata: dict) -> dict[str, np.ndarray]:
    """A shard's arrays, memory-mapped read-only: reading a batch touches only its rows."""
    names = ["example_ids", "offsets", *array_layout(metadata)]
    missing = [name for name in names if not (shard_dir / f"{name}.npy").is_file()]
    if missing:
        raise CacheIncompleteError(f"{shard_dir}: missing {', '.join(missing)}.npy; rebuild the cache")
    return {name: np.load(shard_dir / f"{name}.npy", mmap_mode="r") for name in names}


def _position_range(shard: dict[str, np.ndarray], example_id: int, num_examples: int) -> tuple[int, int]:
    """The rows [start, end) of `example_id`'s positions in its shard."""
    local = int(np.searchsorted(shard["example_ids"], example_id))
    if local >= len(shard["example_ids"]) or shard["example_ids"][local] != example_id:
        raise KeyError(f"example {example_id} is not in the teacher cache (it holds rows 0..{num_examples - 1})")
    return int(shard["offsets"][local]), int(shard["offsets"][local + 1])
