"""Chat with a saved ensemble (or one of its members): the chat template applied, the answer streamed.

    python generate.py runs/2026-11-29/run_1 "What is the capital of France?"
    python generate.py runs/2026-11-29/run_1 "Name three colors." --member 0 --max_new_tokens 40
    python generate.py runs/2026-11-29/run_1 "Tell me a story." --temperature 0.8 --seed 1
    python generate.py runs/2026-11-29/run_1/ensemble/member_0 "Hello"

The ensemble decodes from its members' combined logits, each member keeping its own KV cache. A single model's folder
(a member's, or any causal LM's) is loaded and answers alone.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer

from ensemble import EnsembleConfig, ModelEnsemble, NotAnEnsembleError


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
    return parser.parse_args(argv)


def ensemble_folder(path: str) -> Path:
    folder = Path(path)
    folder = folder / "ensemble" if (folder / "ensemble").is_dir() else folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no saved ensemble here (expected a run folder with ensemble/, an ensemble "
                                "folder or a model folder); a run saves its ensemble after its first round")
    return folder


def load_model(folder: Path, member: int | None):
    """The ensemble saved in `folder`, or only its member `member`; a single model's folder loads that model."""
    config = AutoConfig.from_pretrained(folder)
    if not isinstance(config, EnsembleConfig):
        if member is not None:
            raise MemberError(f"--member {member}: {folder} holds a single {config.model_type!r} model, not an "
                              "ensemble; leave out --member")
        return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    if member is None:
        return ModelEnsemble.from_pretrained(folder)
    if not 0 <= member < len(config.member_subfolders):
        raise MemberError(f"--member {member}: the ensemble in {folder} has {len(config.member_subfolders)} "
                          f"member(s), numbered 0 to {len(config.member_subfolders) - 1}")
    return AutoModelForCausalLM.from_pretrained(folder, subfolder=config.member_subfolders[member],
                                                use_safetensors=True)


def tokenizer_folder(folder: Path) -> Path:
    """`folder`, or the ensemble folder around it for a member saved without its own tokenizer."""
    if not (folder / "tokenizer_config.json").is_file() and (folder.parent / "tokenizer_config.json").is_file():
        return folder.parent
    return folder


def main(argv=None) -> str:
    args = parse_args(argv)
    folder = ensemble_folder(args.run_dir)
    model = load_model(folder, args.member)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    output = model.generate(**prompt, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, NotAnEnsembleError, MemberError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
