"""Chat with a saved ensemble (or one of its members): the chat template applied, the answer streamed.

    python generate.py runs/2026-11-29/run_1 "What is the capital of France?"
    python generate.py runs/2026-11-29/run_1 "Name three colors." --member 0 --max_new_tokens 40
    python generate.py runs/2026-11-29/run_1 "Tell me a story." --temperature 0.8 --seed 1
    python generate.py runs/2026-11-29/run_1/ensemble/member_0 "Hello"
    python generate.py runs/2026-11-29/run_1 "Hello" --member_devices cuda:0,cuda:1     # members at once, a GPU each
    torchrun --nproc_per_node 2 generate.py runs/2026-11-29/run_1 "Hello" --distributed  # a process per share

The ensemble decodes from its members' combined logits, each member keeping its own KV cache. A single model's folder
(a member's, or any causal LM's) is loaded and answers alone. With --distributed (distributed_ensemble.py) every
process holds a share of the members and decodes the same tokens; the first prints the answer, and at the end all
check that they decoded the same text. An answer with no text (only whitespace and end-of-turn tokens) prints as a
line that says so and lists its tokens, never as blank lines. Each folder read is checked against its checksums.json
before its weights load: a damaged file is refused by name, with exit code 2.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, TextStreamer

from checksums import DamagedFolderError
from ensemble import EnsembleConfig, NotAnEnsembleError, load_member
from slm_ensembles import distributed_ensemble
from slm_ensembles.answer_text import shown_answer
from slm_ensembles.processes import run_command
from slm_ensembles.run_layout import RunLayout


class MemberError(ValueError):
    """--member names no member of the folder's ensemble (or the folder holds a single model)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (its ensemble/ is used), an ensemble folder, or a single "
                        "model's folder (e.g. a member's)")
    parser.add_argument("prompt", help="the user's message")
    parser.add_argument("--member", type=int, default=None, help="answer with this member alone")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    distributed_ensemble.add_placement_args(parser)
    args = parser.parse_args(argv)
    if args.distributed and args.member is not None:
        parser.error("--member answers with one member alone: leave out --distributed")
    return args


def ensemble_folder(path: str) -> Path:
    folder = Path(path)
    folder = RunLayout(folder).ensemble if (RunLayout(folder).ensemble).is_dir() else folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no saved ensemble here (expected a run folder with ensemble/, an ensemble "
                                "folder or a model folder); a run saves its ensemble after its first round")
    return folder


def load_model(folder: Path, args: argparse.Namespace, tokenizer):
    """The ensemble saved in `folder` (placed as `args` say: distributed_ensemble.placed_ensemble), or only its
    member `args.member`; a single model's folder loads that model. Each folder read is checked against its
    checksums.json first, where it has one (DamagedFolderError)."""
    member = args.member
    config = AutoConfig.from_pretrained(folder)
    if not isinstance(config, EnsembleConfig):
        if member is not None or args.distributed:
            option = f"--member {member}" if member is not None else "--distributed"
            raise MemberError(f"{option}: {folder} holds a single {config.model_type!r} model, not an "
                              f"ensemble; leave out {option.split()[0]}")
        return load_member(folder)
    if member is None:
        return distributed_ensemble.placed_ensemble(folder, args, tokenizer)
    if not 0 <= member < len(config.member_subfolders):
        raise MemberError(f"--member {member}: the ensemble in {folder} has {len(config.member_subfolders)} "
                          f"member(s), numbered 0 to {len(config.member_subfolders) - 1}")
    return load_member(folder, config.member_subfolders[member])


def tokenizer_folder(folder: Path) -> Path:
    """`folder`, or the ensemble folder around it for a member saved without its own tokenizer."""
    if not (folder / "tokenizer_config.json").is_file() and (folder.parent / "tokenizer_config.json").is_file():
        return folder.parent
    return folder


def main(argv=None) -> str:
    args = parse_args(argv)
    folder = ensemble_folder(args.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder))
    model = load_model(folder, args, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    prompt = {key: value.to(model.device) for key, value in prompt.items()}
    processes = getattr(model, "processes", None)
    printing = processes is None or processes.rank == 0
    torch.manual_seed(args.seed)  # the same on every process: sampled tokens agree as greedy ones do
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    streamer = StreamerHoldingBlanks(tokenizer, skip_prompt=True, skip_special_tokens=True) if printing else None
    output = model.generate(**prompt, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            streamer=streamer, **sampling)
    new_tokens = output[0, prompt["input_ids"].shape[1]:].tolist()
    if processes is not None:
        check_same_tokens(processes, new_tokens)
    answer = shown_answer(tokenizer, new_tokens)
    if printing and not streamer.showed_text:
        print(answer)  # the streamer held back an answer without text: what it was instead
    return answer


class StreamerHoldingBlanks(TextStreamer):
    """A TextStreamer that holds whitespace back until text follows it: an answer with no text streams nothing,
    and its caller prints what the answer held instead (`showed_text` is False)."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.showed_text = False
        self.held = ""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.showed_text:
            self.held += text
            if not self.held.strip():
                return
            text, self.held, self.showed_text = self.held, "", True
        super().on_finalized_text(text, stream_end)


def check_same_tokens(processes, tokens: list[int]) -> None:
    """Refuse an answer the processes did not all decode: they combine the same logits, so they pick the same
    tokens unless something differs between them that the start-up check could not see."""
    decoded = processes.all_gather_object(tokens)
    differing = [rank for rank, other in enumerate(decoded) if other != decoded[0]]
    if differing:
        raise distributed_ensemble.MismatchedEnsembleError(
            f"rank(s) {differing} decoded other tokens than rank 0: the processes' members or settings differ")


# Bad input: one line naming it and exit code 2 (processes.run_command), never a traceback.
REFUSALS = (FileNotFoundError, NotAnEnsembleError, MemberError, DamagedFolderError, distributed_ensemble.LaunchError,
            distributed_ensemble.MismatchedEnsembleError)

if __name__ == "__main__":
    sys.exit(run_command(main, refusals=REFUSALS))
