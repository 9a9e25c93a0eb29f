"""A cache of the teacher's outputs at supervised positions, so that training never runs the teacher's body.

Usage:

    python teacher_cache.py --teacher PATH --data_dir PREPARED_DATASET_DIR --output_dir DIR \
        --mode topk --k 64 --temperature 1.0 --batch_size 8
    accelerate launch --num_processes 4 teacher_cache.py ...     # one shard per process, same arguments

`--data_dir` is a folder written by preprocess_dataset.py; `--split` (default train) picks its split. Two modes:

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
    shard.json           the settings the shard was built with, its example and position counts

The cache is keyed by dataset row index, and a position's row is its rank in the row-major order of
losses.predictor_mask, example by example. So that the trainer knows which rows a batch holds, give the dataset an
`example_id` column (`with_example_ids`) and keep it through shuffling; fingerprint the split as prepared, before
adding that column, both when building and when opening the cache (`cache_identity`).

`TeacherCache.open` compares the settings the trainer expects (teacher fingerprint and dtype, tokenizer, dataset,
max length, mode, k, temperature, ...) with metadata.json and refuses any difference: a cache is never reused for
another setting.
"""

import argparse
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import run_state
from losses import predictor_mask
from model_io import IGNORE_INDEX, PaddingCollator, hidden_at, output_head

FORMAT_VERSION = 2
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
# The metadata fields that say which teacher, tokenizer and data a cache belongs to (see cache_identity).
IDENTITY_FIELDS = ("teacher", "teacher_fingerprint", "teacher_dtype", "tokenizer_hash", "dataset_fingerprint",
                   "max_length")


class CacheMismatchError(ValueError):
    """The cache was built for other settings than the ones it is opened for."""


class CacheIncompleteError(RuntimeError):
    """The cache folder is not a finished cache: metadata.json or some shards are missing or inconsistent."""


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
        run_state.write_atomically(memo_file, json.dumps(memo, indent=2, sort_keys=True) + "\n")
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
    from preprocess_dataset import _tokenizer_sha256

    return {
        "teacher": str(teacher_path),
        "teacher_fingerprint": teacher_fingerprint(teacher_path, fingerprint_memo),
        "teacher_dtype": dtype_name(teacher_dtype),
        "tokenizer_hash": _tokenizer_sha256(tokenizer),
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
                value_dtype: str = "uint8") -> Path:
    """Run the teacher (eval, no grad) over this rank's rows of `dataset` and write shard_{rank:05d}; return it.

    `metadata` holds the identity fields (see `cache_identity`); the cache's own settings (mode, k, temperature,
    value_dtype, vocab_size, hidden_size, teacher_dtype, num_examples, world_size) are added here. In hidden mode k
    and the temperature do not apply and are recorded as null. After every rank's shard exists, call
    `write_metadata` once to finish the cache. A stale metadata.json is removed first, so a cache being rebuilt
    cannot be opened.
    """
    settings = _shard_settings(teacher, dataset, mode=mode, k=k, temperature=temperature, vocab_size=vocab_size,
                               metadata=metadata, world_size=world_size, value_dtype=value_dtype)
    _check_example_ids(dataset)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / METADATA_FILE).unlink(missing_ok=True)
    example_ids = np.arange(rank, len(dataset), world_size, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(_supervised_position_counts(dataset, example_ids))]).astype(np.int64)

    staging = Path(tempfile.mkdtemp(prefix=f".{shard_name(rank)}.partial-", dir=cache_dir))
    try:
        np.save(staging / "example_ids.npy", example_ids)
        np.save(staging / "offsets.npy", offsets)
        writer = ShardWriter(staging, settings, num_positions=int(offsets[-1]))
        _run_teacher(teacher, dataset, example_ids, offsets, batch_size, collator, writer)
        writer.close()
        record = {"rank": rank, "settings": settings, "num_examples": len(example_ids),
                  "num_positions": int(offsets[-1])}
        (staging / SHARD_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return _publish(staging, cache_dir / shard_name(rank))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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


def _publish(staging: Path, shard_dir: Path) -> Path:
    """Move the finished shard into place (a rename: readers never see half a shard); a shard another process
    finished first for the same settings is kept."""
    from utils import publish_folder

    def is_same_build(folder: Path) -> bool:
        record = folder / SHARD_RECORD_FILE
        return record.is_file() and json.loads(record.read_text()) == json.loads(
            (staging / SHARD_RECORD_FILE).read_text())

    publish_folder(staging, shard_dir, is_same_build)
    return shard_dir


class ShardWriter:
    """Fills a shard's preallocated, memory-mapped arrays batch by batch with the teacher's outputs."""

    def __init__(self, folder: Path, settings: dict, num_positions: int):
        self.settings = settings
        self.cursor = 0
        self.arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, (num_positions, *shape))
                       for name, (dtype, shape) in array_layout(settings).items()}

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
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()


def _to_float16(hidden: torch.Tensor) -> np.ndarray:
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
    agree with the shards'. Written last and atomically (run_state.write_atomically: fsync, then rename): a folder
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
    run_state.write_atomically(cache_dir / METADATA_FILE, json.dumps(complete, indent=2) + "\n")


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


def open_or_build(cache_dir, teacher, dataset, identity: dict, settings: dict, *, batch_size: int, collator,
                  state) -> "TeacherCache":
    """The cache in `cache_dir` of the teacher's outputs on `dataset` (the split as prepared, without example
    ids), whose identity is `identity` (cache_identity), in `settings` (cache_settings): opened when it is
    complete and built for them; otherwise built by every process of `state` (one shard each), finished by the
    main process, and opened. A finished cache built for anything else is refused (CacheMismatchError names the
    field), never overwritten."""
    cache_dir = Path(cache_dir)
    expected = {**identity, **settings}
    try:
        return TeacherCache.open(cache_dir, expected)
    except CacheIncompleteError:
        print(f"building the teacher cache ({settings['mode']}) in {cache_dir}")
    build_cache(teacher, with_example_ids(dataset), cache_dir, mode=settings["mode"], k=settings.get("k"),
                temperature=settings.get("temperature"), vocab_size=settings["vocab_size"], batch_size=batch_size,
                collator=collator, metadata=identity, rank=state.process_index, world_size=state.num_processes,
                value_dtype=settings.get("value_dtype", "uint8"))
    state.wait_for_everyone()
    if state.is_main_process:
        write_metadata(cache_dir, identity)
    state.wait_for_everyone()
    return TeacherCache.open(cache_dir, expected)


def training_cache(config, teacher, teacher_path: str, tokenizer, split, collator, state) -> "TeacherCache | None":
    """A run's cache of the teacher's outputs on its training split `split` in the config's teacher_mode (None for
    the online teacher), built once and shared by every round and every run with the same teacher, data and
    settings (in cache_dir/teacher_cache)."""
    if config.teacher_mode == "online":
        return None
    with state.main_process_first():  # one process hashes the teacher's weights, the others read its memo
        identity = cache_identity(teacher_path, tokenizer, split, config.max_length, teacher.dtype,
                                  Path(config.cache_dir) / FINGERPRINT_MEMO_FILE)
    return _run_cache(config, teacher, identity, len(tokenizer), split, collator, state, config.teacher_mode,
                      "teacher_cache")


def evaluation_caches(config, teacher, train_cache: "TeacherCache", splits: dict, collator,
                      state) -> tuple["TeacherCache", ...]:
    """The teacher's final hidden states on each of `splits` (the held-out ones: test, weight_fit), cached once in
    cache_dir/teacher_eval_cache, so that evaluating a run never runs the teacher's body. They share the training
    cache's identity, each with its split's fingerprint, so nothing is hashed again."""
    return tuple(_run_cache(config, teacher, identity_for_split(train_cache.metadata, split),
                            train_cache.metadata["vocab_size"], split, collator, state, "hidden", "teacher_eval_cache")
                 for split in splits.values())


def _run_cache(config, teacher, identity: dict, vocab_size: int, split, collator, state, mode: str,
               folder: str) -> "TeacherCache":
    """The cache of `split` in `mode`, in the folder of cache_dir/`folder` that its identity and settings name."""
    settings = cache_settings(mode, vocab_size, config.cache_k, config.temperature, config.cache_value_dtype)
    return open_or_build(cache_folder(Path(config.cache_dir) / folder, identity, settings), teacher, split, identity,
                         settings, batch_size=config.eval_batch_size, collator=collator, state=state)


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
        _check_shards(cache_dir, settings, _shard_records(cache_dir))
        shards = [_map_shard(cache_dir / shard_name(rank), metadata) for rank in range(metadata["world_size"])]
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
                                     f"run wants {field} = {wanted!r}; rebuild the cache for these settings "
                                     "(teacher_cache.py) or point to another one")


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


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher folder or downloaded hub name (safetensors)")
    parser.add_argument("--data_dir", required=True, help="a folder written by preprocess_dataset.py")
    parser.add_argument("--split", default="train", help="split of the prepared dataset to cache")
    parser.add_argument("--output_dir", required=True, help="the cache folder; the teacher's weight hashes are "
                        f"remembered next to it, in {FINGERPRINT_MEMO_FILE}")
    parser.add_argument("--mode", default="topk", choices=MODES)
    parser.add_argument("--k", type=int, default=64, help="topk: log-probabilities kept per position")
    parser.add_argument("--temperature", type=float, default=1.0, help="topk: the training temperature T")
    parser.add_argument("--value_dtype", default="uint8", choices=VALUE_DTYPES, help="topk: storage of the values")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="teacher dtype: auto, float32, bfloat16 or float16")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import preprocess_dataset
    import utils

    args = parse_args(argv)
    state = utils.process_state()
    data, data_metadata = preprocess_dataset.load_dataset_dir(args.data_dir)
    dataset = data[args.split]
    tokenizer = utils.load_tokenizer(args.teacher, args.trust_remote_code)
    teacher_dtype = utils.frozen_dtype(args.dtype, state.device)
    with state.main_process_first():  # one process hashes the weights, the others read its memo
        identity = cache_identity(args.teacher, tokenizer, dataset, data_metadata["max_length"], teacher_dtype,
                                  Path(args.output_dir).resolve().parent / FINGERPRINT_MEMO_FILE)
    if identity["tokenizer_hash"] != data_metadata["tokenizer_sha256"]:
        raise SystemExit(f"error: {args.data_dir} was tokenized with another tokenizer than the teacher's")
    teacher = utils.load_causal_lm(args.teacher, teacher_dtype, args.trust_remote_code)
    settings = cache_settings(args.mode, len(tokenizer), args.k, args.temperature, args.value_dtype)
    open_or_build(args.output_dir, teacher.to(state.device), dataset, identity, settings, batch_size=args.batch_size,
                  collator=PaddingCollator(tokenizer.pad_token_id), state=state)
    if state.is_main_process:
        print(f"teacher cache ({args.mode}) of {len(dataset)} examples in {args.output_dir}")


if __name__ == "__main__":
    try:
        main()
    except CacheMismatchError as error:  # a finished cache for other settings: kept, and named
        raise SystemExit(f"error: {error}") from None
    finally:
        import utils

        utils.leave_process_group()
