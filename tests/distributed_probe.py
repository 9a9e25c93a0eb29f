"""One optimizer step of DistillationTrainer on however many processes launched it; the main process saves what the
step did. Run by tests/test_distributed.py, e.g.:

    accelerate launch --cpu --num_processes 2 tests/distributed_probe.py OUT.pt --batch_size 2 --grad_accum 2

The global batch is the whole 8-example dataset whatever the split into processes and micro-batches, so a
1-process and a 2-process run must take the same step. With SGD at learning rate 1 the update is minus the
gradient. Saved: the step's loss (summed over micro-batches and processes, as the Trainer logs it), the update of
every parameter, the example ids each process trained on, and how many steps each process took (with
--signal_rank, one process receives the preemption signal: all must stop together, and checkpoint).
"""

import argparse
import copy
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, reduce
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, when run as a script

from slm_ensembles import teacher_cache  # noqa: E402
from config import build_config  # noqa: E402
from conftest import build_tiny_llama, build_tokenizer, load_chats  # noqa: E402
from model_io import PaddingCollator  # noqa: E402
from preprocess_dataset import tokenize_conversation  # noqa: E402
from train import DistillationTrainer  # noqa: E402
from utils import process_state  # noqa: E402
from slm_ensembles.losses import LossSettings  # noqa: E402
from slm_ensembles.processes import PreemptionSignal, StopOnSignal, leave_process_group  # noqa: E402
from slm_ensembles.run_state import RecordChecksums  # noqa: E402
from slm_ensembles.teacher_cache import with_example_ids  # noqa: E402
from trl import SFTConfig  # noqa: E402

NUM_EXAMPLES = 8


class RecordingTrainer(DistillationTrainer):
    """Keeps each micro-batch's loss and example ids; process `slow_rank` writes its RNG state of a checkpoint two
    seconds late, as on a slow file system."""

    def __init__(self, *args, slow_rank: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses, self.example_ids = [], []
        self.slow_rank = slow_rank

    def _save_rng_state(self, output_dir):
        if self.args.process_index == self.slow_rank:
            time.sleep(2)
        super()._save_rng_state(output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(loss.detach())
        self.example_ids.extend(inputs["example_id"].tolist())
        return loss


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--grad_accum", type=int, required=True)
    parser.add_argument("--teacher_mode", default="online", choices=["online", "topk"])
    parser.add_argument("--work_dir", required=True, help="shared by the runs compared (the teacher cache lives here)")
    parser.add_argument("--max_steps", type=int, default=1)
    parser.add_argument("--signal_rank", type=int, default=-1, help="this process sends itself SIGUSR1 before training")
    parser.add_argument("--slow_rank", type=int, default=-1, help="this process writes its RNG state 2 s late")
    return parser.parse_args()


def main_probe():
    args = parse_args()
    state = process_state()
    work_dir = Path(args.work_dir)
    tokenizer = build_tokenizer("chatml")
    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length=64) for chat in load_chats()]
    dataset = Dataset.from_list([row for row in rows if row is not None][:NUM_EXAMPLES])
    assert len(dataset) == NUM_EXAMPLES, "the chat fixture must give 8 examples"
    teacher = build_tiny_llama(tokenizer, seed=1, hidden_size=48)
    member = build_tiny_llama(tokenizer, seed=2)
    student = build_tiny_llama(tokenizer, seed=3).train()
    start = copy.deepcopy(student.state_dict())

    cache = None
    if args.teacher_mode == "topk":
        teacher_path = work_dir / "teacher"
        if state.is_main_process and not teacher_path.exists():
            teacher.save_pretrained(teacher_path)
        state.wait_for_everyone()
        config = build_config("test", overrides=dict(teacher_mode="topk", cache_k=16, cache_value_dtype="float16",
                                                     cache_dir=str(work_dir / "cache"), eval_batch_size=3))
        cache = teacher_cache.training_cache(config, lambda: teacher, teacher.dtype, str(teacher_path), tokenizer,
                                             dataset, PaddingCollator(tokenizer.pad_token_id), state)

    arguments = SFTConfig(
        output_dir=str(work_dir / f"out_{state.num_processes}"), use_cpu=True, report_to=[], save_strategy="no",
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, bf16=False,
        activation_checkpointing=False, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=1e9, seed=0, data_seed=0, logging_steps=1)
    trainer = RecordingTrainer(student, teacher, [member], LossSettings(alpha=0.5, temperature=2.0), len(tokenizer),
                               arguments, with_example_ids(dataset), tokenizer, teacher_cache=cache,
                               slow_rank=args.slow_rank)
    preemption = PreemptionSignal().install()
    trainer.add_callback(StopOnSignal(preemption))
    trainer.add_callback(RecordChecksums())
    if state.process_index == args.signal_rank:
        os.kill(os.getpid(), signal.SIGUSR1)
    trainer.train()

    # Each process's loss is its micro-batches' sum over the step's global token count, times the process count
    # (DDP averages gradients): the step's loss is the mean over processes of those sums.
    loss = reduce(torch.stack(trainer.losses).sum(), reduction="mean").item()
    example_ids = gather_object([trainer.example_ids])
    steps_done = gather_object([trainer.state.global_step])
    stopped_by_signal = gather_object([preemption.received is not None])
    if state.is_main_process:
        update = {key: (value - start[key]).detach() for key, value in student.state_dict().items()}
        torch.save({"loss": loss, "update": update, "example_ids": example_ids, "num_processes": state.num_processes,
                    "steps_done": steps_done, "stopped_by_signal": stopped_by_signal}, args.out)
    state.wait_for_everyone()
    leave_process_group()


if __name__ == "__main__":
    main_probe()
    sys.stdout.flush()
    os._exit(0)  # as main.py does with several processes: skip a teardown that now and then aborts
