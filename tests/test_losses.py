"""The hybrid loss against references written plainly here, from the textbook formulas."""

import math

import pytest
import torch

from torch._dynamo.testing import CompileCounterWithBackend

from losses import (LossSettings, Projection, SparseTarget, chunked_hybrid_loss_sums, compile_loss_terms,
                    divergence_sum, hybrid_loss_sums, hybrid_loss_terms, next_token_targets, nll_sum, predictor_mask)


def reference_kl(p, q):
    """KL(p || q) for probability vectors, summed term by term."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0)


def softmax(z, temperature=1.0):
    return torch.softmax(z.double() / temperature, dim=-1)


@pytest.fixture
def logit_pair():
    torch.manual_seed(0)
    return torch.randn(5, 11), torch.randn(5, 11)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_equal_the_textbook_sums(logit_pair, temperature):
    teacher, model = logit_pair
    p, q = softmax(teacher, temperature), softmax(model, temperature)
    forward = sum(reference_kl(p[i], q[i]) for i in range(len(p)))
    reverse = sum(reference_kl(q[i], p[i]) for i in range(len(p)))
    assert divergence_sum(teacher, model, "forward_kl", temperature).item() == pytest.approx(forward, rel=1e-5)
    assert divergence_sum(teacher, model, "reverse_kl", temperature).item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the directions really differ on these inputs


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_generalized_jsd_equals_its_definition(logit_pair, beta):
    teacher, model = logit_pair
    p, q = softmax(teacher), softmax(model)
    expected = 0.0
    for i in range(len(p)):
        m = beta * p[i] + (1 - beta) * q[i]
        expected += beta * reference_kl(p[i], m) + (1 - beta) * reference_kl(q[i], m)
    assert divergence_sum(teacher, model, "jsd", beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_jsd_at_one_half_is_symmetric_and_bounded(logit_pair):
    teacher, model = logit_pair
    forward = divergence_sum(teacher, model, "jsd", beta=0.5)
    backward = divergence_sum(model, teacher, "jsd", beta=0.5)
    assert forward.item() == pytest.approx(backward.item(), rel=1e-5)
    assert 0 < forward.item() <= len(teacher) * math.log(2)


def test_divergences_vanish_for_identical_distributions(logit_pair):
    teacher, _ = logit_pair
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence_sum(teacher, teacher.clone(), kind).item() == pytest.approx(0.0, abs=1e-5)


def test_unknown_divergence_is_refused(logit_pair):
    with pytest.raises(ValueError, match="unknown divergence 'tvd'"):
        divergence_sum(*logit_pair, kind="tvd")


def test_predictor_mask_and_targets_shift_by_one():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    assert predictor_mask(labels).tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert next_token_targets(labels).tolist() == [5, 6, 7, 8]


def naive_hybrid(student, teacher, members, targets, alpha, temperature):
    """alpha * T^2 * KL(teacher || mean-logit mixture) + (1 - alpha) * NLL(mixture), summed, term by term."""
    mixture = (student + sum(members)) / (len(members) + 1) if members else student
    p_teacher, p_mix_t = softmax(teacher, temperature), softmax(mixture, temperature)
    p_mix = softmax(mixture)
    total = 0.0
    for i in range(len(targets)):
        total += alpha * temperature**2 * reference_kl(p_teacher[i], p_mix_t[i])
        total += (1 - alpha) * -math.log(p_mix[i, targets[i]].item())
    return total


@pytest.mark.parametrize("num_members", [0, 1, 3])
@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.8, 2.0), (0.0, 1.0), (1.0, 1.0)])
def test_hybrid_loss_matches_the_naive_reference(num_members, alpha, temperature):
    torch.manual_seed(num_members)
    student, teacher = torch.randn(6, 13), torch.randn(6, 13)
    members = [torch.randn(6, 13) for _ in range(num_members)]
    targets = torch.randint(0, 13, (6,))
    sums = hybrid_loss_sums(student, teacher, members, targets, LossSettings(alpha=alpha, temperature=temperature))
    expected = naive_hybrid(student, teacher, members, targets, alpha, temperature)
    assert sums.total.item() == pytest.approx(expected, rel=1e-5)
    assert sums.num_tokens == 6


def test_with_no_members_it_is_plain_distillation():
    torch.manual_seed(1)
    student, teacher, targets = torch.randn(4, 9), torch.randn(4, 9), torch.randint(0, 9, (4,))
    sums = hybrid_loss_sums(student, teacher, [], targets, LossSettings(alpha=0.3, temperature=2.0))
    plain = 0.3 * 4.0 * divergence_sum(teacher, student, temperature=2.0) + 0.7 * nll_sum(student, targets)
    assert sums.total.item() == pytest.approx(plain.item(), rel=1e-6)


def test_nll_on_the_student_alone_ignores_the_members():
    torch.manual_seed(2)
    student, targets = torch.randn(4, 9), torch.randint(0, 9, (4,))
    members = [torch.randn(4, 9)]
    sums = hybrid_loss_sums(student, None, members, targets, LossSettings(alpha=0.0, nll_target="student"))
    assert sums.total.item() == pytest.approx(nll_sum(student, targets).item(), rel=1e-6)
    on_mixture = hybrid_loss_sums(student, None, members, targets, LossSettings(alpha=0.0))
    assert on_mixture.total.item() != pytest.approx(sums.total.item(), rel=1e-3)


def test_probability_averaging_uses_the_mixture_of_probabilities():
    torch.manual_seed(3)
    student, teacher, member = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7)
    targets = torch.randint(0, 7, (3,))
    sums = hybrid_loss_sums(student, teacher, [member], targets, LossSettings(alpha=1.0, combine="probs"))
    p_mix = (softmax(student) + softmax(member)) / 2
    expected = sum(reference_kl(softmax(teacher)[i], p_mix[i]) for i in range(3))
    assert sums.total.item() == pytest.approx(expected, rel=1e-5)


def test_only_the_student_receives_gradients():
    torch.manual_seed(4)
    student = torch.randn(5, 8, requires_grad=True)
    teacher = torch.randn(5, 8, requires_grad=True)
    members = [torch.randn(5, 8, requires_grad=True) for _ in range(2)]
    targets = torch.randint(0, 8, (5,))
    # The trainer computes teacher and members under no_grad; detaching here is the same contract.
    sums = hybrid_loss_sums(student, teacher.detach(), [m.detach() for m in members], targets, LossSettings())
    sums.total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and all(m.grad is None for m in members)


def test_loss_is_computed_in_fp32_from_bf16_logits():
    torch.manual_seed(5)
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    targets = torch.randint(0, 9, (4,))
    full = hybrid_loss_sums(student, teacher, [], targets, LossSettings())
    half = hybrid_loss_sums(student.bfloat16(), teacher.bfloat16(), [], targets, LossSettings())
    assert half.total.dtype == torch.float32
    assert half.total.item() == pytest.approx(full.total.item(), rel=2e-2)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
def test_chunked_loss_equals_the_unchunked_loss_and_gradients(divergence, chunk_size):
    torch.manual_seed(6)
    vocab, width, positions = 23, 8, 17
    student_head = torch.nn.Linear(width, vocab, bias=False)
    # Frozen, as the trainer's teacher and members are.
    teacher_head = torch.nn.Linear(width, vocab).requires_grad_(False)
    member_head = torch.nn.Linear(width, vocab).requires_grad_(False)
    student_hidden = torch.randn(positions, width, requires_grad=True)
    teacher_hidden, member_hidden = torch.randn(positions, width), torch.randn(positions, width)
    targets = torch.randint(0, vocab, (positions,))
    settings = LossSettings(alpha=0.6, temperature=1.5, divergence=divergence)

    def run(size):
        student_hidden.grad, student_head.weight.grad = None, None
        sums = chunked_hybrid_loss_sums(Projection(student_hidden, student_head),
                                        Projection(teacher_hidden, teacher_head),
                                        [Projection(member_hidden, member_head)], targets, settings, size)
        sums.total.backward()
        return sums, student_hidden.grad.clone(), student_head.weight.grad.clone()

    with torch.no_grad():
        reference = hybrid_loss_sums(student_head(student_hidden), teacher_head(teacher_hidden),
                                     [member_head(member_hidden)], targets, settings)
    whole, hidden_grad, head_grad = run(0)
    chunked, chunked_hidden_grad, chunked_head_grad = run(chunk_size)
    assert whole.total.item() == pytest.approx(reference.total.item(), rel=1e-6)
    assert chunked.total.item() == pytest.approx(whole.total.item(), rel=1e-5)
    assert chunked.divergence.item() == pytest.approx(whole.divergence.item(), rel=1e-5)
    assert chunked.nll.item() == pytest.approx(whole.nll.item(), rel=1e-5)
    torch.testing.assert_close(chunked_hidden_grad, hidden_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_head_grad, head_grad, atol=1e-5, rtol=1e-5)
    assert teacher_head.weight.grad is None and member_head.weight.grad is None


def test_kl_scale_multiplies_the_distillation_term_only(logit_pair):
    teacher, student = logit_pair
    member = torch.randn_like(student)
    targets = torch.tensor([1, 2, 3, 4, 5])
    plain = hybrid_loss_sums(student, teacher, [member], targets, LossSettings(alpha=0.4, temperature=2.0))
    scaled = hybrid_loss_sums(student, teacher, [member], targets,
                              LossSettings(alpha=0.4, temperature=2.0, kl_scale=2.0))
    assert scaled.divergence == pytest.approx(plain.divergence.item())
    assert scaled.total.item() == pytest.approx(2.0 * 0.4 * 4.0 * plain.divergence.item() + 0.6 * plain.nll.item(),
                                                rel=1e-6)


def test_mixture_weights_set_the_mixture_the_loss_sees(logit_pair):
    teacher, student = logit_pair
    member = torch.randn_like(student)
    targets = torch.tensor([1, 2, 3, 4, 5])
    settings = LossSettings(alpha=0.0, combine="additive", mixture_weights=(0.5, 1.0))
    sums = hybrid_loss_sums(student, teacher, [member], targets, settings)
    assert sums.nll.item() == pytest.approx(nll_sum(0.5 * student + member, targets).item(), rel=1e-6)
    alone = hybrid_loss_sums(student, teacher, [], targets, LossSettings(alpha=0.0, combine="weighted",
                                                                         mixture_weights=(1.0,)))
    assert alone.nll.item() == pytest.approx(nll_sum(student, targets).item(), rel=1e-6)


def top_k_target(teacher_logits, k, temperature):
    """A cached teacher as teacher_cache.py stores one: top-k log-probabilities at T, their ids, the tail's log-mass."""
    log_probs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    top, ids = log_probs.topk(k, dim=-1)
    rest = torch.ones_like(log_probs, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.where(rest, log_probs, float("-inf")).logsumexp(dim=-1)  # -inf when k = V: an empty tail
    return SparseTarget(top, ids, tail)


MIXTURE_WEIGHTS = {"logits": None, "probs": None, "weighted": (0.5, 0.3, 0.2), "additive": (0.7, 1.0, 1.0)}


class ChunkedLossCase:
    """A student head on hidden states, a frozen teacher and two frozen members, all on the same positions."""

    def __init__(self, teacher_kind, combine, divergence, positions=17, vocab=23, width=8, temperature=1.5):
        torch.manual_seed(7)
        self.student_head = torch.nn.Linear(width, vocab, bias=False)
        self.member_heads = [torch.nn.Linear(width, vocab).requires_grad_(False) for _ in range(2)]
        self.student_hidden = torch.randn(positions, width, requires_grad=True)
        self.member_hidden = [torch.randn(positions, width) for _ in range(2)]
        self.targets = torch.randint(0, vocab, (positions,))
        teacher_head = torch.nn.Linear(width, vocab).requires_grad_(False)
        teacher_hidden = torch.randn(positions, width)
        if teacher_kind == "dense":
            self.teacher = Projection(teacher_hidden, teacher_head)
        else:
            k = vocab if teacher_kind == "top_k=V" else 5
            self.teacher = top_k_target(teacher_head(teacher_hidden), k, temperature)
        self.settings = LossSettings(alpha=0.6, temperature=temperature, divergence=divergence, combine=combine,
                                     mixture_weights=MIXTURE_WEIGHTS[combine])

    def run(self, chunk_size, loss_terms=hybrid_loss_terms):
        """The loss sums and the gradients of the student's hidden states and head."""
        self.student_hidden.grad, self.student_head.weight.grad = None, None
        members = [Projection(hidden, head) for hidden, head in zip(self.member_hidden, self.member_heads)]
        sums = chunked_hybrid_loss_sums(Projection(self.student_hidden, self.student_head), self.teacher, members,
                                        self.targets, self.settings, chunk_size, loss_terms)
        sums.total.backward()
        return sums, self.student_hidden.grad.clone(), self.student_head.weight.grad.clone()


def assert_same_loss_and_gradients(actual, expected):
    (sums, hidden_grad, head_grad), (ref_sums, ref_hidden_grad, ref_head_grad) = actual, expected
    for name in ("total", "divergence", "nll"):
        assert getattr(sums, name).item() == pytest.approx(getattr(ref_sums, name).item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(hidden_grad, ref_hidden_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_grad, ref_head_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("combine", ["logits", "probs", "weighted", "additive"])
@pytest.mark.parametrize("teacher_kind", ["dense", "top_k=V", "top_k<V"])
def test_chunked_loss_equals_the_unchunked_one_for_every_teacher_target_and_combine_mode(teacher_kind, combine,
                                                                                       divergence):
    case = ChunkedLossCase(teacher_kind, combine, divergence)
    whole = case.run(chunk_size=0)
    assert whole[0].divergence.item() > 0 and whole[1].abs().sum() > 0
    for chunk_size in (4, 5):  # last chunks of 1 and 2 positions
        assert_same_loss_and_gradients(case.run(chunk_size), whole)


@pytest.mark.parametrize("teacher_kind,combine,divergence", [("dense", "logits", "forward_kl"),
                                                              ("top_k<V", "probs", "jsd"),
                                                              ("dense", "weighted", "reverse_kl")])
def test_compiled_loss_equals_the_eager_loss_and_compiles_once_for_every_chunk_size(teacher_kind, combine,
                                                                                      divergence):
    case = ChunkedLossCase(teacher_kind, combine, divergence)
    counter = CompileCounterWithBackend("aot_eager")  # traces and differentiates as inductor would, fast on CPU
    compiled = compile_loss_terms(backend=counter)
    eager = case.run(chunk_size=5)  # 17 positions: chunks of 5, 5, 5 and a last one of 2
    assert_same_loss_and_gradients(case.run(chunk_size=5, loss_terms=compiled), eager)
    assert_same_loss_and_gradients(case.run(chunk_size=4, loss_terms=compiled), case.run(chunk_size=4))
    whole = case.run(chunk_size=0)
    assert_same_loss_and_gradients(case.run(chunk_size=0, loss_terms=compiled), whole)
    # The compiled function ran, and its row dimension is dynamic: chunks of 5, 4, 3 and 17 rows share one graph
    # (chunk_size=4 leaves a last chunk of 1 row, a size torch.compile specialises: that adds one).
    assert counter.frame_count == 2


def naive_hybrid_over_sequences(student, teacher, member, labels, alpha, temperature):
    """The hybrid loss of [B, L, V] logits, summed position by position over t whose next label is supervised."""
    total = 0.0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            next_token = labels[row, t + 1].item()
            if next_token == -100:
                continue
            mixture = (student[row, t] + member[row, t]) / 2
            log_p_teacher = torch.log_softmax(teacher[row, t] / temperature, dim=-1)
            log_p_mixture_t = torch.log_softmax(mixture / temperature, dim=-1)
            kl = torch.sum(log_p_teacher.exp() * (log_p_teacher - log_p_mixture_t))
            total = total + alpha * temperature**2 * kl - (1 - alpha) * torch.log_softmax(mixture, -1)[next_token]
    return total


def test_positions_masked_in_the_middle_of_a_sequence_contribute_nothing():
    torch.manual_seed(8)
    vocab = 11
    # Row 0: prompt, assistant turn, user turn, assistant turn, padding. Row 1: prompt, one answer, padding.
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100, -100, -100, 6, 7, -100, -100],
                           [-100, -100, -100, 8, 9, 10, 2, -100, -100, -100, -100, -100]])
    shape = (*labels.shape, vocab)
    student, teacher, member = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    settings = LossSettings(alpha=0.4, temperature=2.0)

    def pipeline_loss(student_logits, teacher_logits, member_logits):
        student_logits = student_logits.clone().requires_grad_(True)
        mask = predictor_mask(labels)
        sums = hybrid_loss_sums(student_logits[mask], teacher_logits[mask], [member_logits[mask]],
                                next_token_targets(labels), settings)
        sums.total.backward()
        return sums.total, student_logits.grad

    loss, gradient = pipeline_loss(student, teacher, member)
    reference_student = student.clone().requires_grad_(True)
    expected = naive_hybrid_over_sequences(reference_student, teacher, member, labels, 0.4, 2.0)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(gradient, reference_student.grad, atol=1e-6, rtol=1e-5)

    # Large random logits at every position that predicts an unsupervised token (the start, the user turn in the
    # middle, the end) change neither the loss nor the student's gradient, which is 0 there.
    unsupervised = torch.ones_like(labels, dtype=torch.bool)
    unsupervised[:, :-1] = labels[:, 1:] == -100
    assert unsupervised[0, 4:7].all() and not unsupervised[0, 3] and not unsupervised[0, 7]  # the middle turn
    noisy = [torch.where(unsupervised.unsqueeze(-1), 100 * torch.randn(shape), logits)
             for logits in (student, teacher, member)]
    noisy_loss, noisy_gradient = pipeline_loss(*noisy)
    assert noisy_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(noisy_gradient, gradient, atol=0, rtol=0)
    assert (gradient[unsupervised] == 0).all() and gradient[~unsupervised].abs().sum() > 0


def test_probability_averaging_at_a_temperature_tempers_the_ensembles_own_prediction():
    """combine=probs, T = 2: the divergence compares softmax(teacher / T) with p_mix^(1/T) normalised, where p_mix
    is the mean of the members' probabilities at T = 1 (what the ensemble predicts); the NLL is on p_mix itself."""
    torch.manual_seed(9)
    student, teacher, member = torch.randn(4, 7), torch.randn(4, 7), torch.randn(4, 7)
    targets = torch.randint(0, 7, (4,))
    alpha, temperature = 0.7, 2.0
    sums = hybrid_loss_sums(student, teacher, [member], targets,
                            LossSettings(alpha=alpha, temperature=temperature, combine="probs"))
    p_mix = (softmax(student) + softmax(member)) / 2
    tempered = p_mix ** (1 / temperature)
    tempered = tempered / tempered.sum(dim=-1, keepdim=True)
    p_teacher = softmax(teacher, temperature)
    expected = sum(alpha * temperature**2 * reference_kl(p_teacher[i], tempered[i])
                   + (1 - alpha) * -math.log(p_mix[i, targets[i]].item()) for i in range(4))
    assert sums.total.item() == pytest.approx(expected, rel=1e-5)
    # It is not the mixture of the members' tempered distributions, which would give another value.
    mixed_tempered = (softmax(student, temperature) + softmax(member, temperature)) / 2
    other = sum(reference_kl(p_teacher[i], mixed_tempered[i]) for i in range(4))
    assert sums.divergence.item() != pytest.approx(other, rel=1e-3)
