"""How a generated answer is shown: its text, or, for an answer with no text (only whitespace and end-of-turn or other
special tokens), a line that says so and lists its tokens. Undertrained models often answer with newlines only,
which printed as such look like no answer at all, or like a crash.
"""

import itertools

MAX_LISTED_RUNS = 8  # runs of one repeated token a textless answer lists; the rest are left as "..."


def shown_answer(tokenizer, token_ids) -> str:
    """The answer's text (special tokens left out), or `textless_answer` when that is only whitespace."""
    token_ids = [int(token) for token in token_ids]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return text if text.strip() else textless_answer(tokenizer, token_ids)


def textless_answer(tokenizer, token_ids: list[int]) -> str:
    """E.g. "(no text: 12 tokens, all whitespace/end-of-turn: '\\n' x11, '<|im_end|>')": the tokens, each run of
    one repeated token once with its count."""
    count = f"{len(token_ids)} token{'' if len(token_ids) == 1 else 's'}"
    if not token_ids:
        return f"(no text: {count})"
    runs = [(piece, len(list(run))) for piece, run in itertools.groupby(tokenizer.decode([t]) for t in token_ids)]
    listed = [repr(piece) + (f" x{length}" if length > 1 else "") for piece, length in runs[:MAX_LISTED_RUNS]]
    more = ", ..." if len(runs) > MAX_LISTED_RUNS else ""
    return f"(no text: {count}, all whitespace/end-of-turn: {', '.join(listed)}{more})"
