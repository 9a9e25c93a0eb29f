"""answer_text: an answer with no text is shown as a line that lists its tokens, never as blank lines."""

import torch
from conftest import build_diverse_member

import generate
from slm_ensembles.answer_text import shown_answer
from slm_ensembles.evaluation import sample_answers


def newline_model(tokenizer, newlines: int | None = None):
    """A tiny model whose head favours the newline token: it answers with newlines only, or with `newlines` of them
    (its first forwards, one per new token) and then text."""
    model = build_diverse_member(tokenizer, 3)
    (newline,) = tokenizer.encode("\n")
    favour = torch.zeros(len(tokenizer))
    favour[newline] = 1e4
    forwards = []

    def favour_newlines(module, args, logits):
        forwards.append(None)
        return logits + favour if newlines is None or len(forwards) <= newlines else logits

    model.lm_head.register_forward_hook(favour_newlines)
    return model


def test_an_answer_of_whitespace_and_end_of_turn_lists_its_tokens(tokenizer):
    newlines = tokenizer.encode("\n" * 11)
    assert shown_answer(tokenizer, [*newlines, tokenizer.eos_token_id]) == (
        "(no text: 12 tokens, all whitespace/end-of-turn: '\\n' x11, '<|im_end|>')")
    assert shown_answer(tokenizer, [tokenizer.eos_token_id]) == "(no text: 1 token, all whitespace/end-of-turn: " \
                                                                "'<|im_end|>')"
    assert shown_answer(tokenizer, []) == "(no text: 0 tokens)"
    text = tokenizer.encode("\n\nParis") + [tokenizer.eos_token_id]
    assert shown_answer(tokenizer, torch.tensor(text)) == "\n\nParis"  # an answer with text is its text


def test_sample_answers_of_a_model_that_answers_newlines_say_so(tokenizer):
    (row,) = sample_answers({"newlines": newline_model(tokenizer)}, tokenizer, ["Hello"], max_new_tokens=6)
    assert row["answer"] == "(no text: 6 tokens, all whitespace/end-of-turn: '\\n' x6)"


def test_generate_prints_a_line_for_an_answer_of_newlines(tiny_teacher_dir, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load_model", lambda folder, args, tokenizer: newline_model(tokenizer))
    capsys.readouterr()
    answer = generate.main([str(tiny_teacher_dir), "Hello", "--max_new_tokens", "5"])
    assert answer == "(no text: 5 tokens, all whitespace/end-of-turn: '\\n' x5)"
    assert capsys.readouterr().out == answer + "\n"


def test_generate_streams_the_newlines_before_an_answers_text(tiny_teacher_dir, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load_model", lambda folder, args, tokenizer: newline_model(tokenizer, newlines=2))
    capsys.readouterr()
    answer = generate.main([str(tiny_teacher_dir), "Hello", "--max_new_tokens", "6"])
    assert answer.startswith("\n\n") and answer.strip()
    assert capsys.readouterr().out == answer + "\n"
