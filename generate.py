"""Chat with a saved ensemble (or one of its members): the chat template applied, the answer streamed.

    python generate.py runs/2026-11-29/run_1 "What is the capital of France?"
    python generate.py runs/2026-11-29/run_1 "Name three colors." --member 0 --max_new_tokens 40
    python generate.py runs/2026-11-29/run_1 "Tell me a story." --temperature 0.8 --seed 1

The ensemble decodes from its members' combined logits, each member keeping its own KV cache.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, TextStreamer

from ensemble import ModelEnsemble


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (its ensemble/ is used) or an ensemble folder")
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
        raise FileNotFoundError(f"{path}: no saved ensemble here (expected a run folder with ensemble/, or an "
                                "ensemble folder); a run saves its ensemble after its first round")
    return folder


def main(argv=None) -> str:
    args = parse_args(argv)
    folder = ensemble_folder(args.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ensemble = ModelEnsemble.from_pretrained(folder)
    model = ensemble if args.member is None else ensemble.members[args.member]
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
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
